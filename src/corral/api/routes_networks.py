"""Network routes, and the NIC and port-forward verbs of VMs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api.auth import Caller, admin, viewer
from corral.api.state import AppState, app_state, db_session
from corral.api.views import Accepted, JobView, NetworkView, VMView
from corral.cluster import networks
from corral.cluster.identity import Role
from corral.cluster.vm_rows import ensure_idle, get_vm
from corral.spec.network import VXLAN_OVERHEAD, NetworkSpec, PortForwardSpec
from corral.spec.vm import NicSpec
from corral.store.models import VM, Job, NetworkPort

router = APIRouter(tags=["networks"])
ACCEPTED: dict[str, Any] = {"status_code": status.HTTP_202_ACCEPTED, "response_model": Accepted}


class ForwardRemove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host_port: int
    protocol: str = "tcp"


class NetworkShow(NetworkView):
    """One network, with each host's part in it (the list leaves that out: a heartbeat's worth of rows per network)."""

    host_states: dict[str, str] = Field(
        default_factory=dict, description="each host the network spans: joined, joining, error or local"
    )


def _users(session: Session, network_id: str) -> list[str]:
    return list(
        session.scalars(
            select(VM.name).join(NetworkPort, NetworkPort.vm_id == VM.id).where(NetworkPort.network_id == network_id)
        ).unique()
    )


@router.get("/networks", response_model=list[NetworkView])
def list_networks(caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> list[NetworkView]:
    return [
        NetworkView.of(net, _users(session, net.id), networks.network_hosts(session, net.id))
        for net in networks.list_networks(session, caller.project)
    ]


@router.get("/networks/{name}", response_model=NetworkShow)
def show_network(name: str, caller: Caller = Depends(viewer), session: Session = Depends(db_session)) -> NetworkShow:
    network = networks.get_network(session, name, caller.project)
    states = networks.network_host_states(session, network)
    view = NetworkView.of(network, _users(session, network.id), list(states))
    return NetworkShow(**view.model_dump(), host_states=states)


@router.post("/networks", **ACCEPTED)
def create_network(
    request: NetworkSpec, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    # Bridge mode joins a host LAN: a cluster admin's call, or an uplink the administrator allowed for tenants.
    any_bridge = caller.principal.cluster and caller.principal.role >= Role.ADMIN
    with state.store.session() as session:
        job = networks.create(
            session,
            request,
            caller.project,
            any_host_bridge=any_bridge,
            allowed_uplinks=state.settings.bridge_uplinks,
            max_mtu=state.settings.underlay_mtu - VXLAN_OVERHEAD if state.store.shared else None,
        )
        network = networks.get_network(session, request.name, caller.project)
        return Accepted(job=JobView.of(job), network=NetworkView.of(network, []))


@router.delete("/networks/{name}", **ACCEPTED)
def delete_network(name: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    with state.store.session() as session:
        return Accepted(job=JobView.of(networks.delete(session, name, caller.project)))


def _vm_verb(state: AppState, caller: Caller, name: str, verb: Callable[[Session, VM], Job]) -> Accepted:
    """Run a NIC or forward verb on a VM no other job is busy with."""
    with state.store.session() as session:
        vm = get_vm(session, name, caller.project)
        ensure_idle(session, vm)
        job = verb(session, vm)
        return Accepted(job=JobView.of(job), vm=VMView.of(vm))


@router.post("/vms/{name}/nics", **ACCEPTED)
def add_nic(
    name: str, request: NicSpec, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    return _vm_verb(state, caller, name, lambda session, vm: networks.nic_add(session, vm, request))


@router.delete("/vms/{name}/nics/{nic}", **ACCEPTED)
def remove_nic(name: str, nic: str, caller: Caller = Depends(admin), state: AppState = Depends(app_state)) -> Accepted:
    return _vm_verb(state, caller, name, lambda session, vm: networks.nic_remove(session, vm, nic))


@router.post("/vms/{name}/port-forwards", **ACCEPTED)
def add_port_forward(
    name: str, request: PortForwardSpec, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    # On a single host (the SQLite store) the VM's host is this machine: a port some program holds is refused now.
    # In a pool, the VM's agent refuses it when it binds the port.
    single_host = state.settings.database is None
    return _vm_verb(
        state,
        caller,
        name,
        lambda session, vm: networks.add_forward(
            session, vm, request, state.settings.forward_ports, probe_host=single_host
        ),
    )


@router.post("/vms/{name}/port-forwards/remove", **ACCEPTED)
def remove_port_forward(
    name: str, request: ForwardRemove, caller: Caller = Depends(admin), state: AppState = Depends(app_state)
) -> Accepted:
    return _vm_verb(
        state,
        caller,
        name,
        lambda session, vm: networks.remove_forward(session, vm, request.host_port, request.protocol),
    )
