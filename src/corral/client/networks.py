"""The SDK's virtual networks and a VM's NICs and port forwards."""

from __future__ import annotations

from typing import Any

from corral.client.connection import Connection


class NetworksApi(Connection):
    """Networks, NICs and port forwards."""

    def networks(self) -> list[dict[str, Any]]:
        return self.request("GET", "/networks")

    def network(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/networks/{name}")

    def create_network(
        self,
        name: str,
        mode: str = "nat",
        subnet: str | None = None,
        uplink: str | None = None,
        dhcp: bool = True,
        vni: int | None = None,
        mtu: int | None = None,
    ) -> dict[str, Any]:
        body = {"name": name, "mode": mode, "subnet": subnet, "uplink": uplink, "dhcp": dhcp, "vni": vni, "mtu": mtu}
        return self.request("POST", "/networks", json={k: v for k, v in body.items() if v is not None})

    def delete_network(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/networks/{name}")

    def add_nic(self, vm: str, network: str, mac: str | None = None) -> dict[str, Any]:
        body = {"network": network, **({"mac": mac} if mac else {})}
        return self.request("POST", f"/vms/{vm}/nics", json=body)

    def remove_nic(self, vm: str, nic: str | int) -> dict[str, Any]:
        return self.request("DELETE", f"/vms/{vm}/nics/{nic}")

    def add_port_forward(self, vm: str, host_port: int, guest_port: int, protocol: str = "tcp") -> dict[str, Any]:
        body = {"host_port": host_port, "guest_port": guest_port, "protocol": protocol}
        return self.request("POST", f"/vms/{vm}/port-forwards", json=body)

    def remove_port_forward(self, vm: str, host_port: int, protocol: str = "tcp") -> dict[str, Any]:
        body = {"host_port": host_port, "protocol": protocol}
        return self.request("POST", f"/vms/{vm}/port-forwards/remove", json=body)
