// corral's web console: plain ES module, no framework. Every piece of data comes from the REST API through the
// session cookie (HttpOnly: this script never sees it); every call carries the X-Corral-UI header, the same-origin
// proof the daemon wants with a cookie. Nothing from the API is ever put into the page as HTML: text nodes only.

const main = document.getElementById("main");
const RANK = { viewer: 1, operator: 2, admin: 3 };
let me = null; // {user, project, role, cluster}
let leaving = []; // cleanups of the current page (event streams, consoles, timers)
// The current page's reads: aborted when another page is asked for, so a slow page never draws over the new one.
let pageReads = new AbortController();

// -- the API -----------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.status = status;
    this.hint = problem.hint || "";
  }
}

// ``signal``: by default the current page's (reads); verbs pass null, they finish even if the user moves on.
async function api(method, path, body, signal = pageReads.signal) {
  const options = { method, credentials: "same-origin", headers: { "X-Corral-UI": "1" }, signal };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const answer = await fetch(path, options);
  if (answer.status === 204) return null;
  const type = answer.headers.get("content-type") || "";
  const data = type.includes("json") ? await answer.json() : await answer.text();
  if (!answer.ok) {
    if (answer.status === 401 && path !== "/ui/session") showLogin("Your session has ended: log in again.");
    throw new ApiError(answer.status, typeof data === "object" ? data : { detail: String(data) });
  }
  return data;
}

const can = (role) => me && RANK[me.role] >= RANK[role];

// A job returned by a verb: wait for its end (long-poll), telling progress in the toast.
async function waitJob(accepted, what) {
  let job = accepted.job;
  const note = toast(`${what}: ${job.state}`);
  while (job.state === "queued" || job.state === "running") {
    job = await api("GET", `/jobs/${job.id}?wait=30&version=${job.version}`, undefined, null);
    note.textContent = `${what}: ${job.state} ${Math.round((job.progress || 0) * 100)}% ${job.message || ""}`;
  }
  if (job.state !== "succeeded") {
    note.textContent = `${what} ${job.state}: ${job.error || ""}`;
    note.className = "error";
  }
  setTimeout(() => note.remove(), 6000);
  return job;
}

// -- DOM helpers -------------------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// The page's new content (null and false stand for what this role is not shown).
const show = (...nodes) => main.replaceChildren(...nodes.flat().filter((node) => node !== null && node !== undefined && node !== false));

function toast(text) {
  const note = h("div", {}, text);
  document.getElementById("toast").append(note);
  return note;
}

function fail(error) {
  const note = toast(error.hint ? `${error.message} (${error.hint})` : error.message);
  note.className = "error";
  setTimeout(() => note.remove(), 8000);
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 10 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

const stateTag = (state) => h("span", { class: `state state-${state}` }, state);

// A sortable, filterable table: columns are [label, value(row), render(row)?].
function dataTable(rows, columns, { filter = true, select = null, empty = "none" } = {}) {
  let key = 0;
  let ascending = true;
  let text = "";
  const body = h("tbody");
  const chosen = new Set();
  const draw = () => {
    const shown = rows.filter((row) => !text || columns.some(([, value]) => String(value(row) ?? "").toLowerCase().includes(text)));
    shown.sort((a, b) => {
      const [x, y] = [columns[key][1](a), columns[key][1](b)];
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x ?? "").localeCompare(String(y ?? ""));
      return ascending ? order : -order;
    });
    body.replaceChildren(
      ...(shown.length
        ? shown.map((row) =>
            h(
              "tr",
              {},
              select
                ? h("td", {}, h("input", {
                    type: "checkbox",
                    "aria-label": `select ${select(row)}`,
                    checked: chosen.has(select(row)),
                    onchange: (event) => (event.target.checked ? chosen.add(select(row)) : chosen.delete(select(row))),
                  }))
                : null,
              columns.map(([, value, render, cls]) => h("td", { class: cls }, render ? render(row) : value(row) ?? "-")),
            ),
          )
        : [h("tr", {}, h("td", { colspan: columns.length + (select ? 1 : 0), class: "muted" }, empty))]),
    );
  };
  const head = h(
    "tr",
    {},
    select ? h("th", {}, "") : null,
    columns.map(([label, , , cls], index) =>
      h("th", { class: cls, scope: "col" }, h("button", {
        class: "sort",
        type: "button",
        onclick: () => {
          ascending = key === index ? !ascending : true;
          key = index;
          draw();
        },
      }, label)),
    ),
  );
  draw();
  const wrap = h(
    "div",
    {},
    filter
      ? h("input", {
          type: "search",
          placeholder: "Filter…",
          "aria-label": "Filter",
          oninput: (event) => {
            text = event.target.value.toLowerCase();
            draw();
          },
        })
      : null,
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), body)),
  );
  wrap.chosen = chosen;
  return wrap;
}

// -- server-sent events over fetch (EventSource cannot send the X-Corral-UI header) -----------------------------

// ``after``: the newest event already shown, so that nothing that happened since the page loaded is missed.
function followEvents(query, onEvent, after = null) {
  const stop = new AbortController();
  (async () => {
    while (!stop.signal.aborted) {
      try {
        const url = `/events?follow=true&${query}${after ? `&after=${after}` : ""}`;
        const answer = await fetch(url, { credentials: "same-origin", headers: { "X-Corral-UI": "1" }, signal: stop.signal });
        if (!answer.ok) return;
        const reader = answer.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = frame.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
            if (data) {
              const event = JSON.parse(data);
              after = event.id;
              onEvent(event);
            }
          }
        }
      } catch (error) {
        if (stop.signal.aborted) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  })();
  leaving.push(() => stop.abort());
}

function eventLine(event) {
  const data = event.data || {};
  const change = data.to ? `${data.from ?? "?"} → ${data.to}` : "";
  const detail = [change || data.state, data.kind, data.message, data.error].filter(Boolean).join(" ");
  return h("li", {}, `${event.at.slice(11, 19)} ${event.type} ${event.resource.kind}/${event.resource.name} ${detail}`);
}

// -- login -------------------------------------------------------------------------------------------------------

function showLogin(message = "") {
  me = null;
  cleanup();
  document.getElementById("top").hidden = true;
  const error = h("p", { class: "error", id: "login-error", role: "alert" }, message);
  const token = h("input", { id: "token", type: "password", autocomplete: "off", required: true, "aria-describedby": "login-error" });
  show(
    h("h1", {}, "Log in to corral"),
    h(
      "form",
      {
        class: "stack",
        onsubmit: async (event) => {
          event.preventDefault();
          try {
            me = await api("POST", "/ui/session", { token: token.value }, null);
            token.value = "";
            start();
          } catch (failure) {
            error.textContent = failure.message;
          }
        },
      },
      h("label", {}, "Token", token),
      h("p", { class: "muted" }, "Make one with `corral token create`. It is kept by the daemon for this session only."),
      h("button", { class: "primary", type: "submit" }, "Log in"),
      error,
    ),
  );
  token.focus();
}

// -- pages -------------------------------------------------------------------------------------------------------

const PAGES = [
  ["#/", "Dashboard", () => true],
  ["#/vms", "VMs", () => true],
  ["#/networks", "Networks", () => true],
  ["#/images", "Images", () => true],
  ["#/backups", "Backups", () => true],
  ["#/jobs", "Jobs", () => true],
  ["#/hosts", "Hosts", () => me.cluster],
  ["#/projects", "Projects", () => true],
  ["#/tokens", "Tokens", () => me.cluster && can("admin")],
  ["#/audit", "Audit", () => can("admin")],
];

async function dashboard() {
  const [vms, jobs, hosts] = await Promise.all([
    api("GET", "/vms"),
    api("GET", "/jobs?active=true"),
    me.cluster ? api("GET", "/hosts") : Promise.resolve(null),
  ]);
  const counts = {};
  for (const vm of vms) counts[vm.state] = (counts[vm.state] || 0) + 1;
  const recent = h("ul", { class: "events", id: "events" });
  const alerts = h("ul", { id: "alerts" });
  for (const host of hosts || []) {
    if (host.state !== "up" && host.state !== "online") alerts.append(h("li", { class: "alert" }, `host ${host.name} is ${host.state}`));
  }
  const failed = (await api("GET", "/jobs?limit=20")).filter((job) => job.state === "failed");
  for (const job of failed.slice(0, 5)) alerts.append(h("li", { class: "alert" }, `job ${job.kind} ${job.target_name} failed: ${job.error || ""}`));
  show(
    h("h1", {}, "Dashboard"),
    h(
      "div",
      { class: "grid" },
      h("section", { class: "card" }, h("h2", {}, "VMs"), Object.keys(counts).length
        ? h("ul", { id: "vm-counts" }, Object.entries(counts).map(([state, count]) => h("li", {}, stateTag(state), ` ${count}`)))
        : h("p", { class: "muted" }, "No VMs yet.")),
      h("section", { class: "card" }, h("h2", {}, "Running jobs"), jobs.length
        ? h("ul", {}, jobs.map((job) => h("li", {}, `${job.kind} ${job.target_name}: ${job.state} `,
            h("span", { class: "bar", role: "progressbar", "aria-valuenow": Math.round(job.progress * 100) },
              h("span", { style: `width:${Math.round(job.progress * 100)}%` })))))
        : h("p", { class: "muted" }, "None.")),
      h("section", { class: "card" }, h("h2", {}, "Alerts"), alerts.childElementCount ? alerts : h("p", { class: "muted" }, "None.")),
    ),
    hosts
      ? h("section", { class: "card" }, h("h2", {}, "Hosts"), dataTable(hosts, [
          ["Host", (x) => x.name],
          ["State", (x) => x.state, (x) => stateTag(x.drained ? `${x.state} (drained)` : x.state)],
          ["VMs", (x) => x.vms],
          ["CPUs", (x) => x.allocated_cpus, (x) => `${x.allocated_cpus} / ${x.cpus}`],
          ["Memory", (x) => x.allocated_memory, (x) => `${size(x.allocated_memory)} / ${size(x.memory)}`],
          ["Storage free", (x) => x.storage_free, (x) => `${size(x.storage_free)} / ${size(x.storage_total)}`, "hide-narrow"],
        ], { filter: false }))
      : null,
    h("section", { class: "card" }, h("h2", {}, "Recent events"), recent),
  );
  const seen = await eventsOnce("limit=20");
  for (const event of seen) recent.append(eventLine(event));
  followEvents("", (event) => recent.prepend(eventLine(event)), seen.length ? seen[0].id : 0);
}

async function eventsOnce(query) {
  const text = await api("GET", `/events?${query}`);
  return String(text)
    .split("\n\n")
    .map((frame) => frame.split("\n").find((line) => line.startsWith("data: ")))
    .filter(Boolean)
    .map((line) => JSON.parse(line.slice(6)))
    .reverse();
}

async function vmList() {
  const vms = await api("GET", "/vms");
  const table = dataTable(vms, [
    ["Name", (x) => x.name, (x) => h("a", { href: `#/vm/${encodeURIComponent(x.name)}` }, x.name)],
    ["State", (x) => x.state, (x) => stateTag(x.state)],
    ["Host", (x) => x.host, null, "hide-narrow"],
    ["Addresses", (x) => (x.interfaces || []).flatMap((nic) => nic.addresses || nic.ips || []).join(" "), null, "hide-narrow"],
    ["CPUs", (x) => x.cpus],
    ["Memory", (x) => x.memory, (x) => size(x.memory)],
  ], { select: can("operator") ? (x) => x.name : null, empty: "No VMs yet." });
  const bulk = (verb) => async () => {
    for (const name of table.chosen) {
      try {
        await api("POST", `/vms/${encodeURIComponent(name)}/${verb}`, {}, null);
      } catch (error) {
        fail(error);
      }
    }
    toast(`${verb} asked for ${table.chosen.size} VM(s)`);
    setTimeout(route, 1500);
  };
  show(
    h("h1", {}, "VMs"),
    h("div", { class: "actions" },
      can("admin") ? h("a", { class: "button primary", href: "#/vms/new", id: "create-vm" }, "Create VM") : null,
      can("operator") ? h("button", { type: "button", onclick: bulk("start") }, "Start selected") : null,
      can("operator") ? h("button", { type: "button", onclick: bulk("stop") }, "Stop selected") : null,
      h("button", { type: "button", onclick: route }, "Refresh")),
    table,
  );
}

// Which form field a refusal is about: the API names it ("invalid request: spec.memory: ...") or quotes it.
function fieldOf(message, fields) {
  const named = /^invalid request: (?:spec\.)?([a-z_]+)/.exec(message);
  if (named && fields.includes(named[1])) return named[1];
  const lower = message.toLowerCase();
  const aliases = { name: ["vm name", "name"], image: ["image"], memory: ["memory", "size"], cpus: ["cpu"], nics: ["network"], ssh_keys: ["ssh", "key"], user_data: ["user-data", "user_data"] };
  for (const [field, words] of Object.entries(aliases)) if (words.some((word) => lower.includes(word))) return field;
  return null;
}

async function vmCreate() {
  const [images, networks] = await Promise.all([api("GET", "/images"), api("GET", "/networks")]);
  const fields = ["name", "image", "cpus", "memory", "nics", "ssh_keys", "user_data"];
  const errors = Object.fromEntries(fields.map((field) => [field, h("span", { class: "field-error", id: `error-${field}`, role: "alert" })]));
  const input = (field, control) => {
    control.id = `field-${field}`;
    control.name = field;
    control.setAttribute("aria-describedby", `error-${field}`);
    return control;
  };
  const name = input("name", h("input", { autocomplete: "off" }));
  const image = input("image", h("select", {}, images.map((x) => h("option", { value: x.name }, x.name))));
  const cpus = input("cpus", h("input", { type: "number", value: "1" }));
  const memory = input("memory", h("input", { value: "128M" }));
  const nics = input("nics", h("select", { multiple: true },
    h("option", { value: "user", selected: !networks.length }, "user (NAT, no bridge)"),
    networks.map((x) => h("option", { value: x.name, selected: x.name === "default" }, x.name))));
  const keys = input("ssh_keys", h("textarea", { placeholder: "ssh-ed25519 AAAA… (one per line)" }));
  const userData = input("user_data", h("textarea", { placeholder: "#cloud-config" }));
  const general = h("p", { class: "error", role: "alert", id: "form-error" });
  const submit = h("button", { class: "primary", type: "submit" }, "Create and start");
  const form = h(
    "form",
    {
      class: "stack",
      novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        for (const field of fields) {
          errors[field].textContent = "";
          document.getElementById(`field-${field}`).removeAttribute("aria-invalid");
        }
        general.textContent = "";
        const spec = {
          name: name.value.trim(),
          image: image.value,
          cpus: Number(cpus.value),
          memory: memory.value.trim(),
          nics: [...nics.selectedOptions].map((option) => ({ network: option.value })),
        };
        const sshKeys = keys.value.split("\n").map((line) => line.trim()).filter(Boolean);
        if (sshKeys.length) spec.ssh_keys = sshKeys;
        if (userData.value.trim()) spec.user_data = userData.value;
        submit.disabled = true;
        try {
          const accepted = await api("POST", "/vms", { spec, start: true }, null);
          location.hash = `#/vm/${encodeURIComponent(spec.name)}`;
          waitJob(accepted, `create ${spec.name}`).catch(fail);
        } catch (error) {
          const field = fieldOf(error.message, fields);
          const text = error.hint ? `${error.message} (${error.hint})` : error.message;
          if (field) {
            errors[field].textContent = text;
            document.getElementById(`field-${field}`).setAttribute("aria-invalid", "true");
            document.getElementById(`field-${field}`).focus();
          } else {
            general.textContent = text;
          }
        } finally {
          submit.disabled = false;
        }
      },
    },
    h("label", {}, "Name", name, errors.name),
    h("label", {}, "Image", image, errors.image),
    h("label", {}, "CPUs", cpus, errors.cpus),
    h("label", {}, "Memory", memory, errors.memory),
    h("label", {}, "Networks", nics, errors.nics),
    h("label", {}, "SSH public keys", keys, errors.ssh_keys),
    h("label", {}, "User-data", userData, errors.user_data),
    general,
    submit,
  );
  show(h("h1", {}, "Create a VM"), form);
  name.focus();
}

function chart(points, value, label, format) {
  if (!points.length) return h("p", { class: "muted" }, `${label}: no samples yet`);
  const values = points.map(value).map((x) => Number(x) || 0);
  const peak = Math.max(...values, 1e-9);
  const step = values.length > 1 ? 300 / (values.length - 1) : 0;
  const line = values.map((x, index) => `${(index * step).toFixed(1)},${(78 - (x / peak) * 74).toFixed(1)}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 300 80");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${label}, last ${format(values.at(-1))}, peak ${format(peak)}`);
  const poly = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  poly.setAttribute("points", values.length > 1 ? line : `0,${line.split(",")[1]} 300,${line.split(",")[1]}`);
  svg.append(poly);
  return h("div", {}, h("div", {}, `${label}: ${format(values.at(-1))} (peak ${format(peak)})`), svg);
}

function snapshotTree(vmName, snapshots, refresh) {
  const byName = Object.fromEntries(snapshots.map((snap) => [snap.name, snap]));
  const item = (snap) =>
    h(
      "li",
      { dataset: { snapshot: snap.name } },
      h("span", {},
        h("span", { class: snap.current ? "current" : "" }, snap.name, snap.current ? " (current)" : ""),
        h("span", { class: "muted" }, `${snap.memory ? "with memory" : "disk only"} · ${snap.created_at.slice(0, 19).replace("T", " ")}`),
        can("operator") ? h("button", { type: "button", onclick: () => act("POST", `/vms/${encodeURIComponent(vmName)}/snapshots/${encodeURIComponent(snap.name)}/revert`, `revert to ${snap.name}`, refresh) }, "Revert") : null,
        can("operator") ? h("button", { type: "button", class: "danger", onclick: () => confirm(`Delete snapshot ${snap.name}?`) && act("DELETE", `/vms/${encodeURIComponent(vmName)}/snapshots/${encodeURIComponent(snap.name)}`, `delete ${snap.name}`, refresh) }, "Delete") : null),
      snap.children.length ? h("ul", {}, snap.children.map((child) => byName[child]).filter(Boolean).map(item)) : null,
    );
  const roots = snapshots.filter((snap) => !snap.parent || !byName[snap.parent]);
  return roots.length ? h("ul", { class: "snap-tree", id: "snapshots" }, roots.map(item)) : h("p", { class: "muted", id: "snapshots" }, "No snapshots.");
}

async function act(method, path, what, then, body = {}) {
  try {
    const accepted = await api(method, path, method === "DELETE" ? undefined : body, null);
    if (accepted && accepted.job) await waitJob(accepted, what);
  } catch (error) {
    fail(error);
  }
  if (then) await then();
}

// Called once ``box`` is in the document: xterm.js measures its element when it opens.
function openConsole(vmName, box, status) {
  const term = new window.Terminal({ convertEol: false, cursorBlink: true, fontSize: 13, scrollback: 2000 });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  let socket = null;
  let closed = false;
  const connect = async (replay) => {
    if (replay) {
      try {
        const recent = await api("GET", `/vms/${encodeURIComponent(vmName)}/logs?lines=40`);
        term.write(String(recent).replace(/\r?\n/g, "\r\n"));
      } catch (error) {
        /* no log yet */
      }
    }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/vms/${encodeURIComponent(vmName)}/console?project=${encodeURIComponent(me.project)}`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (message) => {
      if (typeof message.data === "string") {
        const info = JSON.parse(message.data);
        status.textContent = info.error ? `console: ${info.error}` : "connected";
        return;
      }
      term.write(new Uint8Array(message.data));
    };
    socket.onclose = () => {
      if (closed) return;
      status.textContent = "disconnected, reconnecting…"; // e.g. the VM moved to another host
      setTimeout(() => !closed && connect(false), 2000);
    };
  };
  term.onData((data) => socket && socket.readyState === WebSocket.OPEN && socket.send(data));
  const onResize = () => fit.fit();
  window.addEventListener("resize", onResize);
  connect(true);
  leaving.push(() => {
    closed = true;
    window.removeEventListener("resize", onResize);
    if (socket) socket.close();
    term.dispose();
  });
  window.corralTerminal = term; // the browser tests read the screen through it
}

async function vmPage(name) {
  const path = `/vms/${encodeURIComponent(name)}`;
  const vm = await api("GET", path);
  const snapshotsBox = h("div");
  const refreshSnapshots = async () => snapshotsBox.replaceChildren(snapshotTree(name, await api("GET", `${path}/snapshots`), refreshSnapshots));
  const again = async () => {
    if (location.hash === `#/vm/${encodeURIComponent(name)}`) await route();
  };
  const verb = (label, action, role, extra = {}) =>
    can(role) ? h("button", { type: "button", ...extra, onclick: () => act("POST", `${path}/${action}`, `${action} ${name}`, again) }, label) : null;
  const snapName = h("input", { id: "snapshot-name", placeholder: "snapshot name", "aria-label": "Snapshot name" });
  const consoleBox = h("div", { id: "console" });
  const consoleStatus = h("span", { class: "muted", id: "console-status" }, "connecting…");
  const graphs = h("div", { class: "grid", id: "graphs" });
  const backupsBox = h("div", { id: "backups" });
  const refreshBackups = async () => {
    const rows = await api("GET", `/backups?vm=${encodeURIComponent(name)}`);
    backupsBox.replaceChildren(dataTable(rows, [
      ["Backup", (x) => x.name], ["Kind", (x) => x.kind], ["State", (x) => x.state], ["Size", (x) => x.size, (x) => size(x.size)],
      ["Created", (x) => x.created_at],
      ["", (x) => x.name, (x) => (can("operator")
        ? h("button", { type: "button", onclick: () => {
            const as = prompt(`Restore ${x.name} as a new VM named (empty: over ${name}, which must be stopped):`, "");
            if (as === null) return;
            act("POST", `${path}/backups/${encodeURIComponent(x.name)}/restore`, `restore ${x.name}`, refreshBackups, as.trim() ? { as_name: as.trim() } : {});
          } }, "Restore")
        : "")],
    ], { filter: false, empty: "No backups." }));
  };
  const resizeMemory = h("input", { id: "resize-memory", value: "", placeholder: size(vm.memory), "aria-label": "Memory" });
  const resizeCpus = h("input", { id: "resize-cpus", type: "number", min: "1", placeholder: String(vm.cpus), "aria-label": "CPUs" });
  const migrateTo = h("select", { id: "migrate-to", "aria-label": "Target host" }, h("option", { value: "" }, "(the scheduler picks)"));
  const events = h("ul", { class: "events", id: "vm-events" });
  show(
    h("h1", {}, `VM ${vm.name} `, h("span", { id: "vm-state" }, stateTag(vm.state))),
    h("div", { class: "actions" },
      vm.state !== "running" ? verb("Start", "start", "operator", { id: "vm-start" }) : null,
      vm.state === "running" ? verb("Stop", "stop", "operator", { id: "vm-stop" }) : null,
      vm.state === "running" ? verb("Restart", "restart", "operator") : null,
      can("admin") ? h("button", { type: "button", class: "danger", onclick: () => confirm(`Delete VM ${name} and its disks?`) && act("DELETE", path, `delete ${name}`, async () => { location.hash = "#/vms"; }) }, "Delete") : null),
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h2", {}, "Summary"), h("table", {}, h("tbody", {},
        [["Status", vm.status || vm.state], ["Host", vm.host], ["Image", vm.image], ["CPUs", vm.cpus], ["Memory", size(vm.memory)],
          ["Restart policy", vm.restart_policy], ["Created", vm.created_at]].map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v ?? "-")))))),
      h("section", { class: "card" }, h("h2", {}, "Disks"), dataTable(vm.disks, [
        ["Volume", (x) => x.name], ["Size", (x) => x.size, (x) => size(x.size)], ["Pool", (x) => x.pool]], { filter: false })),
      h("section", { class: "card" }, h("h2", {}, "Network interfaces"), dataTable(vm.nics.length ? vm.nics : vm.interfaces, [
        ["Network", (x) => x.network ?? x.name], ["MAC", (x) => x.mac], ["Addresses", (x) => (x.addresses || x.ips || []).join(" ")]], { filter: false }))),
    can("operator")
      ? h("section", { class: "card" }, h("h2", {}, "Serial console ", consoleStatus), consoleBox)
      : null,
    h("section", { class: "card" }, h("h2", {}, "Snapshots"),
      can("operator") ? h("form", { class: "actions", onsubmit: (event) => {
        event.preventDefault();
        const snap = snapName.value.trim();
        act("POST", `${path}/snapshots`, `snapshot ${snap}`, refreshSnapshots, { name: snap });
        snapName.value = "";
      } }, snapName, h("button", { type: "submit", id: "snapshot-create" }, "Take snapshot")) : null,
      snapshotsBox),
    h("section", { class: "card" }, h("h2", {}, "Backups"),
      can("operator") ? h("div", { class: "actions" }, h("button", { type: "button", id: "backup-create", onclick: () => act("POST", `${path}/backups`, `back up ${name}`, refreshBackups, {}) }, "Back up now")) : null,
      backupsBox),
    can("admin") ? h("section", { class: "card" }, h("h2", {}, "Resize and move"),
      h("form", { class: "actions", onsubmit: (event) => {
        event.preventDefault();
        const change = {};
        if (resizeMemory.value.trim()) change.memory = resizeMemory.value.trim();
        if (resizeCpus.value) change.cpus = Number(resizeCpus.value);
        act("POST", `${path}/resize`, `resize ${name}`, again, change);
      } }, h("label", {}, "Memory ", resizeMemory), h("label", {}, "CPUs ", resizeCpus), h("button", { type: "submit" }, "Resize")),
      me.cluster ? h("form", { class: "actions", onsubmit: (event) => {
        event.preventDefault();
        act("POST", `${path}/migrate`, `migrate ${name}`, again, migrateTo.value ? { to: migrateTo.value } : {});
      } }, h("label", {}, "Migrate to ", migrateTo), h("button", { type: "submit" }, "Migrate")) : null) : null,
    h("section", { class: "card" }, h("h2", {}, "Usage (last hour)"), graphs),
    h("section", { class: "card" }, h("h2", {}, "Events"), events),
    h("section", { class: "card" }, h("h2", {}, "Spec"), h("pre", {}, JSON.stringify(vm.spec, null, 2))),
  );
  if (can("operator")) openConsole(name, consoleBox, consoleStatus);
  await refreshSnapshots();
  refreshBackups().catch((error) => backupsBox.replaceChildren(h("p", { class: "muted" }, error.message)));
  if (me.cluster && can("admin")) {
    api("GET", "/hosts").then((hosts) => migrateTo.append(...hosts.filter((x) => x.name !== vm.host).map((x) => h("option", { value: x.name }, x.name)))).catch(() => null);
  }
  api("GET", `${path}/stats?since=1h`).then((history) => {
    const points = history.points || [];
    graphs.replaceChildren(
      chart(points, (p) => p.cpu, "CPU", (x) => `${(x * 100).toFixed(0)}%`),
      chart(points, (p) => p.memory, "Memory", size),
      chart(points, (p) => p.disk_read + p.disk_write, "Disk I/O", (x) => `${size(x)}/s`),
      chart(points, (p) => p.net_rx + p.net_tx, "Network", (x) => `${size(x)}/s`),
    );
  }).catch((error) => graphs.replaceChildren(h("p", { class: "muted" }, error.message)));
  const seen = await eventsOnce(`resource=${encodeURIComponent(name)}&limit=30`);
  for (const event of seen) events.append(eventLine(event));
  // The badge follows the VM's state: on its events, and every 15 s in case a stream was cut (the console
  // reconnects by itself when the VM (re)starts or moves).
  let shownState = vm.state;
  const refreshState = async () => {
    const now = await api("GET", path).catch(() => null);
    if (now && now.state !== shownState) {
      shownState = now.state;
      document.getElementById("vm-state")?.replaceChildren(stateTag(now.state));
    }
  };
  followEvents(`resource=${encodeURIComponent(name)}`, (event) => {
    events.prepend(eventLine(event));
    if (event.resource.kind === "vm") refreshState();
  }, seen.length ? seen[0].id : 0);
  const timer = setInterval(refreshState, 15000);
  leaving.push(() => clearInterval(timer));
  refreshState();
}

async function simpleList(title, path, columns, actions = null) {
  const rows = await api("GET", path);
  show(h("h1", {}, title), actions ? actions() : null, dataTable(rows, columns));
}

const ROUTES = [
  [/^#?\/?$/, dashboard],
  [/^#\/vms$/, vmList],
  [/^#\/vms\/new$/, vmCreate],
  [/^#\/vm\/([^/]+)$/, (name) => vmPage(decodeURIComponent(name))],
  [/^#\/networks$/, () => simpleList("Networks", "/networks", [
    ["Name", (x) => x.name], ["Subnet", (x) => x.subnet ?? x.cidr], ["Mode", (x) => x.mode ?? x.kind], ["State", (x) => x.state]])],
  [/^#\/images$/, () => simpleList("Images and templates", "/images", [
    ["Name", (x) => x.name], ["Size", (x) => x.size, (x) => size(x.size)], ["Format", (x) => x.format], ["Created", (x) => x.created_at]])],
  [/^#\/backups$/, () => simpleList("Backups", "/backups", [
    ["VM", (x) => x.vm], ["Name", (x) => x.name], ["State", (x) => x.state], ["Size", (x) => x.size, (x) => size(x.size)], ["Created", (x) => x.created_at]])],
  [/^#\/jobs$/, () => simpleList("Jobs", "/jobs?limit=100", [
    ["Kind", (x) => x.kind], ["Target", (x) => x.target_name], ["State", (x) => x.state, (x) => stateTag(x.state)],
    ["Progress", (x) => x.progress, (x) => `${Math.round(x.progress * 100)}%`], ["Message", (x) => x.error || x.message], ["Created", (x) => x.created_at]])],
  [/^#\/hosts$/, () => simpleList("Hosts", "/hosts", [
    ["Host", (x) => x.name], ["State", (x) => x.state, (x) => stateTag(x.drained ? `${x.state} (drained)` : x.state)], ["VMs", (x) => x.vms],
    ["CPUs", (x) => x.allocated_cpus, (x) => `${x.allocated_cpus} / ${x.cpus}`], ["Memory", (x) => x.allocated_memory, (x) => `${size(x.allocated_memory)} / ${size(x.memory)}`],
    ["", (x) => x.name, (x) => (me.cluster && can("admin")
      ? h("button", { type: "button", onclick: () => act("POST", `/hosts/${encodeURIComponent(x.name)}/${x.drained ? "undrain" : "drain"}`, `${x.drained ? "undrain" : "drain"} ${x.name}`, route) }, x.drained ? "Undrain" : "Drain")
      : "")]])],
  [/^#\/projects$/, () => simpleList("Projects", "/projects", [
    ["Project", (x) => x.name], ["Description", (x) => x.description, null, "hide-narrow"],
    ["VMs", (x) => x.usage.vms, (x) => `${x.usage.vms} / ${x.max_vms ?? "∞"}`],
    ["vCPUs", (x) => x.usage.vcpus, (x) => `${x.usage.vcpus} / ${x.max_vcpus ?? "∞"}`],
    ["Memory", (x) => x.usage.memory, (x) => `${size(x.usage.memory)} / ${x.max_memory ? size(x.max_memory) : "∞"}`],
    ["Disk", (x) => x.usage.disk, (x) => `${size(x.usage.disk)} / ${x.max_disk ? size(x.max_disk) : "∞"}`]])],
  [/^#\/tokens$/, () => simpleList("Tokens", "/tokens", [
    ["Id", (x) => x.id], ["User", (x) => x.user], ["Project", (x) => x.project], ["Role", (x) => x.role],
    ["Expires", (x) => x.expires_at], ["Revoked", (x) => (x.revoked ? "yes" : "no")],
    ["", (x) => x.id, (x) => (x.revoked ? "" : h("button", { type: "button", class: "danger", onclick: async () => {
      if (!confirm(`Revoke token ${x.id} of ${x.user}?`)) return;
      try {
        await api("POST", `/tokens/${encodeURIComponent(x.id)}/revoke`, {}, null);
      } catch (error) {
        fail(error);
      }
      route();
    } }, "Revoke"))]])],
  [/^#\/audit$/, () => simpleList("Audit log", "/audit?limit=200", [
    ["When", (x) => x.at], ["User", (x) => x.user], ["Request", (x) => `${x.method} ${x.path}`], ["Status", (x) => x.status], ["Result", (x) => x.result]])],
];

function cleanup() {
  for (const stop of leaving) stop();
  leaving = [];
}

async function route() {
  if (!me) return;
  cleanup();
  pageReads.abort();
  pageReads = new AbortController();
  const mine = pageReads.signal;
  const hash = location.hash || "#/";
  for (const link of document.querySelectorAll("#nav a")) {
    const here = link.getAttribute("href") === hash || (hash.startsWith("#/vm") && link.getAttribute("href") === "#/vms");
    link.toggleAttribute("aria-current", false);
    if (here) link.setAttribute("aria-current", "page");
  }
  for (const [pattern, page] of ROUTES) {
    const match = pattern.exec(hash);
    if (match) {
      main.removeAttribute("data-page");
      try {
        await page(...match.slice(1));
        if (mine.aborted) return;
        main.dataset.page = hash; // drawn: what the browser tests wait for
      } catch (error) {
        if (mine.aborted) return; // another page was asked for meanwhile
        show(h("h1", {}, "Cannot show this page"), h("p", { class: "error", role: "alert" }, error.message), h("p", { class: "muted" }, error.hint));
      }
      main.focus({ preventScroll: true });
      return;
    }
  }
  show(h("h1", {}, "Not found"), h("a", { href: "#/" }, "Dashboard"));
}

function start() {
  document.getElementById("top").hidden = false;
  document.getElementById("who").textContent = `${me.user} · ${me.cluster ? "cluster " : ""}${me.role} · project ${me.project}`;
  document.getElementById("nav").replaceChildren(...PAGES.filter(([, , shown]) => shown()).map(([href, label]) => h("a", { href }, label)));
  route();
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("DELETE", "/ui/session", undefined, null).catch(() => null);
  showLogin("Logged out.");
});
window.addEventListener("hashchange", route);

(async () => {
  // A `corral ui` login link carries a one-time code in the fragment (never sent to a server): spend it at once.
  const code = /^#code=([\w-]+)$/.exec(location.hash);
  if (code) {
    history.replaceState(null, "", `${location.pathname}#/`);
    try {
      me = await api("POST", "/ui/session", { code: code[1] }, null);
    } catch (error) {
      showLogin(error.message);
      return;
    }
  } else {
    try {
      me = await api("GET", "/ui/session");
    } catch (error) {
      showLogin();
      return;
    }
  }
  start();
})();
