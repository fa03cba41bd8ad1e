// corral's web console: plain ES module, no framework. Every piece of data comes from the REST API through the
// session cookie (HttpOnly: this script never sees it); every call carries the X-Corral-UI header, the same-origin
// proof the daemon wants with a cookie. Nothing from the API is ever put into the page as HTML: text nodes only.

const main = document.getElementById("main");
const RANK = { viewer: 1, operator: 2, admin: 3 };
let me = null; // {user, project, role, cluster}
// The project the pages act in: the token's own, or another one the caller may see (the switcher in the header).
// Cluster-wide callers see every project; a project's token sees its own only (GET /projects says which).
let project = null;
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

// ``path`` in the chosen project: every project-scoped route takes ?project= (the others ignore it).
function scoped(path) {
  if (!me || !project || project === me.project || path.startsWith("/ui/")) return path;
  return `${path}${path.includes("?") ? "&" : "?"}project=${encodeURIComponent(project)}`;
}

// ``signal``: by default the current page's (reads); verbs pass null, they finish even if the user moves on.
// ``body``: sent as JSON, or as it is when a file (an upload's raw bytes).
async function api(method, path, body, signal = pageReads.signal) {
  const options = { method, credentials: "same-origin", headers: { "X-Corral-UI": "1" }, signal };
  if (body instanceof Blob) {
    options.headers["Content-Type"] = "application/octet-stream";
    options.body = body;
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const answer = await fetch(scoped(path), options);
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
        const url = scoped(`/events?follow=true&${query}${after ? `&after=${after}` : ""}`);
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

// A project's quota is "nearly full" from this share of a limit on: time to ask for more, or to clean up.
const QUOTA_WARN = 0.8;

// Alerts of the project's quotas (every project the caller may see: a cluster admin's whole pool).
function quotaAlerts(projects) {
  const alerts = [];
  for (const x of projects) {
    for (const [what, used, limit, show] of [
      ["VMs", x.usage.vms, x.max_vms, String], ["vCPUs", x.usage.vcpus, x.max_vcpus, String],
      ["memory", x.usage.memory, x.max_memory, size], ["disk", x.usage.disk, x.max_disk, size]]) {
      if (limit !== null && limit !== undefined && used >= limit * QUOTA_WARN) {
        alerts.push(`project ${x.name}: ${what} ${show(used)} of ${show(limit)} (${limit ? Math.round((used / limit) * 100) : 100}% of its quota)`);
      }
    }
  }
  return alerts;
}

async function dashboard() {
  const [vms, jobs, hosts, projects] = await Promise.all([
    api("GET", "/vms"),
    api("GET", "/jobs?active=true"),
    me.cluster ? api("GET", "/hosts") : Promise.resolve(null),
    api("GET", "/projects"),
  ]);
  const counts = {};
  for (const vm of vms) counts[vm.state] = (counts[vm.state] || 0) + 1;
  const recent = h("ul", { class: "events", id: "events" });
  const alerts = h("ul", { id: "alerts" });
  for (const host of hosts || []) {
    // unreachable (no heartbeat), fenced or taken over (HA), offline: every state but online wants a look.
    if (host.state !== "up" && host.state !== "online") alerts.append(h("li", { class: "alert" }, `host ${host.name} is ${host.state}`));
  }
  for (const text of quotaAlerts(projects)) alerts.append(h("li", { class: "alert quota" }, text));
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
// ``aliases``: field -> words of the API's messages about it, the first field that matches wins.
const VM_FIELDS = { name: ["vm name", "name"], image: ["image"], memory: ["memory", "size"], cpus: ["cpu"], nics: ["network"], ssh_keys: ["ssh", "key"], user_data: ["user-data", "user_data"] };
function fieldOf(message, fields, aliases = VM_FIELDS) {
  const named = /^invalid request: (?:spec\.)?([a-z_]+)/.exec(message);
  if (named && fields.includes(named[1])) return named[1];
  const lower = message.toLowerCase();
  for (const [field, words] of Object.entries(aliases)) if (fields.includes(field) && words.some((word) => lower.includes(word))) return field;
  return null;
}

// The field whose value the message quotes ("invalid size 'a lot'"), when exactly one holds it: the API's checks
// of a value do not always know which field it came from.
function quotedField(message, fields) {
  const quoted = [...message.matchAll(/'([^']+)'/g)].map((match) => match[1]);
  const holders = fields.filter(([, , control]) => control.type !== "checkbox" && control.type !== "file" && quoted.includes(control.value.trim()));
  return holders.length === 1 ? holders[0][0] : null;
}

// A refusal the page makes itself, before asking the API (e.g. no file chosen): shown like the API's.
const refuse = (detail, hint = "") => new ApiError(400, { detail, hint });

// A create form: every field labelled, with a place for its error. ``fields``: [name, label, control, words]
// (``words``: how the API's messages name the field). ``send()`` makes the API call(s) and throws the refusal,
// which is shown next to the field it is about (else under the form); nothing is made on a refusal, since the
// API checks a request whole before it makes anything. ``done(result)`` runs after a success.
function apiForm(id, fields, label, send, done = null) {
  const errors = {};
  const aliases = {};
  const general = h("p", { class: "error", role: "alert", id: `${id}-error` });
  const button = h("button", { class: "primary", type: "submit" }, label);
  const rows = fields.map(([name, text, control, words]) => {
    control.id = `${id}-${name}`;
    control.name = name;
    control.setAttribute("aria-describedby", `${id}-${name}-error`);
    errors[name] = h("span", { class: "field-error", id: `${id}-${name}-error`, role: "alert" });
    aliases[name] = words || [`${name}:`, name.replace(/_/g, " ")];
    return control.type === "checkbox"
      ? h("label", { class: "check" }, control, ` ${text}`, errors[name])
      : h("label", {}, text, control, errors[name]);
  });
  const form = h("form", {
    class: "stack",
    id,
    novalidate: true,
    onsubmit: async (event) => {
      event.preventDefault();
      for (const [name, , control] of fields) {
        errors[name].textContent = "";
        control.removeAttribute("aria-invalid");
      }
      general.textContent = "";
      button.disabled = true;
      try {
        const result = await send();
        if (done) await done(result);
      } catch (error) {
        const text = error.hint && !error.message.includes(error.hint) ? `${error.message} (${error.hint})` : error.message;
        const field = fieldOf(error.message, Object.keys(errors), {}) || quotedField(error.message, fields) || fieldOf(error.message, Object.keys(errors), aliases);
        if (field) {
          errors[field].textContent = text;
          const control = fields.find(([name]) => name === field)[2];
          control.setAttribute("aria-invalid", "true");
          control.focus();
        } else {
          general.textContent = text;
        }
      } finally {
        button.disabled = false;
      }
    },
  }, rows, general, button);
  return form;
}

// A form behind a disclosure button (``id``: the <details>), for a page whose list comes first.
const creator = (id, summary, form) => h("details", { class: "card creator", id }, h("summary", {}, summary), form);

// Text of a control, trimmed; numbers and sizes the API parses itself (so that its refusal names the field).
const value = (control) => control.value.trim();
const optional = (control) => value(control) || undefined;
function numberOr(control) {
  const text = value(control);
  if (text === "") return undefined;
  if (!/^\d+$/.test(text)) throw refuse(`${control.name}: ${JSON.stringify(text)} is not a whole number`, "write digits, e.g. 4");
  return Number(text);
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

// One usage graph (uPlot, from npm): the series over the window, with its last value and peak said in text too (for
// screen readers, and for a phone where the plot is small). Drawn into ``box`` once it is in the page (uPlot sizes
// itself from it), and redrawn to the new width when the window is resized.
function chart(box, points, pick, label, format) {
  const values = points.map((point) => Number(pick(point)) || 0);
  const times = points.map((point) => Date.parse(point.at) / 1000);
  const peak = values.length ? Math.max(...values) : 0;
  const summary = values.length ? `${label}: ${format(values.at(-1))} (peak ${format(peak)})` : `${label}: no samples yet`;
  const plot = h("div", { class: "plot", role: "img", "aria-label": summary });
  const card = h("div", { class: "graph", dataset: { series: label } }, h("div", {}, summary), plot);
  box.append(card);
  if (!values.length) return;
  const ink = getComputedStyle(document.body).color;
  const line = getComputedStyle(document.documentElement).getPropertyValue("--accent").trim() || "#2f6fdf";
  const grid = { stroke: "rgba(128,128,128,.25)", width: 1 };
  const axis = { stroke: ink, grid, ticks: grid };
  const options = {
    width: Math.max(plot.clientWidth, 200),
    height: 140,
    legend: { show: false },
    cursor: { drag: { x: false, y: false } },
    scales: { y: { range: (u, min, max) => [0, Math.max(max, label === "CPU" ? 0.05 : 1) * 1.1] } },
    axes: [axis, { ...axis, size: 70, values: (u, ticks) => ticks.map(format) }],
    series: [{}, { label, stroke: line, fill: `${line}33`, width: 1.5, points: { show: values.length < 3 } }],
  };
  const graph = new window.uPlot(options, [times, values], plot);
  const onResize = () => graph.setSize({ width: Math.max(plot.clientWidth, 200), height: 140 });
  window.addEventListener("resize", onResize);
  leaving.push(() => {
    window.removeEventListener("resize", onResize);
    graph.destroy();
  });
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
  let dropped = false; // a later "connected" is a reconnection: say so, with when, so a move is seen to have happened
  let refused = ""; // the daemon's last word on why the console did not open
  // The recent output is replayed by the daemon itself (``replay``) until a connection succeeds: it reads the log
  // after the console is connected, so nothing printed in between is lost; a reconnection goes on where the screen is.
  let replayed = false;
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    refused = "";
    socket = new WebSocket(`${scheme}://${location.host}/vms/${encodeURIComponent(vmName)}/console?project=${encodeURIComponent(project)}&replay=${replayed ? 0 : 40}`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (message) => {
      if (typeof message.data === "string") {
        const info = JSON.parse(message.data);
        refused = info.error || "";
        replayed = replayed || !info.error;
        if (info.error) status.textContent = `console: ${info.error}`;
        else status.textContent = dropped ? `reconnected at ${new Date().toLocaleTimeString()}` : "connected";
        return;
      }
      term.write(new Uint8Array(message.data));
    };
    socket.onclose = () => {
      if (closed) return;
      dropped = true;
      // e.g. the VM moved to another host: the next websocket is opened where the store says it runs now. A
      // refusal (not running, a host out of reach) stays on screen while it tries again.
      status.textContent = refused ? `console: ${refused} (trying again…)` : "disconnected, reconnecting…";
      setTimeout(() => !closed && connect(), 2000);
    };
  };
  term.onData((data) => socket && socket.readyState === WebSocket.OPEN && socket.send(data));
  const onResize = () => fit.fit();
  window.addEventListener("resize", onResize);
  connect();
  leaving.push(() => {
    closed = true;
    window.removeEventListener("resize", onResize);
    if (socket) socket.close();
    term.dispose();
  });
  window.corralTerminal = term; // the browser tests read the screen through it
}

// Clone (a stopped copy, full or linked, or from a snapshot), fork (running copies of a forkable running VM) and
// template (a stopped VM's disks as a base for clones): the new VM's page opens once the API has accepted it.
function copiesSection(vm, path) {
  const cloneName = h("input", { autocomplete: "off", placeholder: `${vm.name}-copy` });
  const linked = h("input", { type: "checkbox" });
  const fromSnapshot = h("select", {}, h("option", { value: "" }, "(its disks as they are now)"));
  const startClone = h("input", { type: "checkbox" });
  api("GET", `${path}/snapshots`).then((snaps) => fromSnapshot.append(...snaps.map((x) => h("option", { value: x.name }, x.name)))).catch(() => null);
  const clone = apiForm("clone", [
    ["name", "Name of the copy", cloneName, ["vm name", "already exists", "name"]],
    ["linked", "Linked (shares this VM's disks as its base; this VM must be stopped)", linked, ["linked"]],
    ["from_snapshot", "From snapshot", fromSnapshot, ["snapshot"]],
    ["start", "Start it", startClone, ["start"]],
  ], "Clone", () => api("POST", `${path}/clone`, { name: value(cloneName), linked: linked.checked, from_snapshot: fromSnapshot.value || undefined, start: startClone.checked }, null),
  (accepted) => {
    location.hash = `#/vm/${encodeURIComponent(accepted.vm.name)}`;
    waitJob(accepted, `clone ${vm.name} as ${accepted.vm.name}`).catch(fail);
  });
  const forkName = h("input", { autocomplete: "off", placeholder: `${vm.name}-fork` });
  const count = h("input", { inputmode: "numeric", value: "1" });
  const fork = apiForm("fork", [
    ["name", "Name of the fork", forkName, ["vm name", "already exists", "name"]],
    ["count", "How many (NAME-1, NAME-2, … when more than one)", count, ["count"]],
  ], "Fork", () => api("POST", `${path}/fork`, { name: value(forkName), count: numberOr(count) ?? 1 }, null),
  (accepted) => {
    const first = numberOr(count) > 1 ? `${value(forkName)}-1` : value(forkName);
    location.hash = `#/vm/${encodeURIComponent(first)}`;
    waitJob(accepted, `fork ${vm.name}`).catch(fail);
  });
  const templateName = h("input", { autocomplete: "off", placeholder: `${vm.name}-base` });
  const template = apiForm("template", [["name", "Template name", templateName, ["template name", "already exists", "name"]]], "Make template",
    () => api("POST", "/templates", { name: value(templateName), source: vm.name }, null),
    (accepted) => {
      templateName.value = "";
      waitJob(accepted, `template ${accepted.job.target_name}`).catch(fail);
    });
  return h("section", { class: "card", id: "vm-copies" }, h("h2", {}, "Clone, fork, template"), h("div", { class: "grid" },
    creator("vm-clone", "Clone", clone), creator("vm-fork", "Fork", fork), creator("vm-template", "Make a template", template)));
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
  // Restore: over this VM (stopped), or as a new VM; the row's button picks the backup in the form.
  const restoreWhich = h("select", {});
  const restoreAs = h("input", { autocomplete: "off", placeholder: `(empty: over ${name}, which must be stopped)` });
  const restoreForm = can("operator") ? creator("backup-restore", "Restore a backup", apiForm("restore", [
    ["backup", "Backup", restoreWhich, ["backup"]],
    ["as_name", "As a new VM named", restoreAs, ["vm name", "already exists"]],
  ], "Restore", () => {
    if (!restoreWhich.value) throw refuse("backup: there is no backup to restore yet", "back the VM up first");
    return api("POST", `${path}/backups/${encodeURIComponent(restoreWhich.value)}/restore`, { as_name: optional(restoreAs) }, null);
  }, (accepted) => {
    restoreAs.value = "";
    waitJob(accepted, `restore ${restoreWhich.value}`).then(refreshBackups).catch(fail);
  })) : null;
  const refreshBackups = async () => {
    const rows = await api("GET", `/backups?vm=${encodeURIComponent(name)}`);
    const chosen = restoreWhich.value;
    restoreWhich.replaceChildren(...rows.filter((x) => x.state === "ready").map((x) => h("option", { value: x.name, selected: x.name === chosen }, x.name)));
    backupsBox.replaceChildren(dataTable(rows, [
      ["Backup", (x) => x.name], ["Kind", (x) => x.kind], ["State", (x) => x.state], ["Size", (x) => x.size, (x) => size(x.size)],
      ["Created", (x) => x.created_at],
      ["", (x) => x.name, (x) => (restoreForm && x.state === "ready"
        ? h("button", { type: "button", onclick: () => {
            restoreWhich.value = x.name;
            restoreForm.open = true;
            restoreAs.focus();
          } }, "Restore…")
        : "")],
    ], { filter: false, empty: "No backups." }));
  };
  const resizeMemory = h("input", { value: "", placeholder: size(vm.memory) });
  const resizeCpus = h("input", { inputmode: "numeric", placeholder: String(vm.cpus) });
  const migrateTo = h("select", {}, h("option", { value: "" }, "(the scheduler picks)"));
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
          ["Restart policy", vm.restart_policy], ["Created", vm.created_at]].map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { id: k === "Host" ? "vm-host" : null }, v ?? "-")))))),
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
      backupsBox, restoreForm),
    can("admin") ? h("section", { class: "card" }, h("h2", {}, "Resize and move"), h("div", { class: "grid" },
      apiForm("resize", [["memory", "Memory", resizeMemory, ["memory", "size"]], ["cpus", "CPUs", resizeCpus, ["cpu"]]], "Resize",
        () => api("POST", `${path}/resize`, { memory: optional(resizeMemory), cpus: numberOr(resizeCpus) }, null),
        (accepted) => void waitJob(accepted, `resize ${name}`).then(again).catch(fail)),
      me.cluster ? apiForm("migrate", [["to", "Migrate to", migrateTo, ["host"]]], "Migrate",
        () => api("POST", `${path}/migrate`, migrateTo.value ? { to: migrateTo.value } : {}, null),
        // The page stays (its console reconnects by itself on the new host); the summary follows the move.
        (accepted) => void (accepted.job ? waitJob(accepted, `migrate ${name}`).then(refreshState).catch(fail) : refreshState())) : null)) : null,
    can("admin") ? copiesSection(vm, path) : null,
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
    graphs.replaceChildren();
    chart(graphs, points, (p) => p.cpu, "CPU", (x) => `${(x * 100).toFixed(0)}%`);
    chart(graphs, points, (p) => p.memory, "Memory", size);
    chart(graphs, points, (p) => p.disk_read + p.disk_write, "Disk I/O", (x) => `${size(x)}/s`);
    chart(graphs, points, (p) => p.net_rx + p.net_tx, "Network", (x) => `${size(x)}/s`);
  }).catch((error) => graphs.replaceChildren(h("p", { class: "muted" }, error.message)));
  const seen = await eventsOnce(`resource=${encodeURIComponent(name)}&limit=30`);
  for (const event of seen) events.append(eventLine(event));
  // The badge follows the VM's state: on its events, and every 15 s in case a stream was cut (the console
  // reconnects by itself when the VM (re)starts or moves).
  let shownState = vm.state;
  let shownHost = vm.host;
  async function refreshState() {
    const now = await api("GET", path).catch(() => null);
    if (now && now.state !== shownState) {
      shownState = now.state;
      document.getElementById("vm-state")?.replaceChildren(stateTag(now.state));
    }
    if (now && now.host !== shownHost) { // moved (from this page, the CLI or a plan): the host and the choices follow
      shownHost = now.host;
      document.getElementById("vm-host")?.replaceChildren(now.host ?? "-");
      if (me.cluster && can("admin")) {
        const hosts = await api("GET", "/hosts").catch(() => []);
        migrateTo.replaceChildren(migrateTo.options[0], ...hosts.filter((x) => x.name !== now.host).map((x) => h("option", { value: x.name }, x.name)));
      }
    }
  }
  followEvents(`resource=${encodeURIComponent(name)}`, (event) => {
    events.prepend(eventLine(event));
    if (event.resource.kind === "vm") refreshState();
  }, seen.length ? seen[0].id : 0);
  const timer = setInterval(refreshState, 15000);
  leaving.push(() => clearInterval(timer));
  refreshState();
}

// -- create forms of the list pages --------------------------------------------------------------------------------

// A list that the page's forms refresh in place (``read`` returns the table for fresh rows).
function liveList(id, rows, table) {
  const box = h("div", { id }, table(rows));
  box.refresh = async () => box.replaceChildren(table(await api("GET", box.path, undefined, null)));
  return box;
}

// After a create was accepted: the list now, and again when its job ends (a toast tells how it went).
async function following(accepted, what, list) {
  await list.refresh();
  if (accepted && accepted.job) waitJob(accepted, what).then(list.refresh).catch(fail);
}

const deleteButton = (what, path, then) =>
  h("button", { type: "button", class: "danger", onclick: () => confirm(`Delete ${what}?`) && act("DELETE", path, `delete ${what}`, then) }, "Delete");

async function networksPage() {
  const list = liveList("network-list", await api("GET", "/networks"), (rows) => dataTable(rows, [
    ["Name", (x) => x.name], ["Mode", (x) => x.mode], ["Subnet", (x) => x.subnet], ["Gateway", (x) => x.gateway, null, "hide-narrow"],
    ["State", (x) => x.state, (x) => stateTag(x.state)], ["VMs", (x) => x.vms.length, (x) => x.vms.join(" ") || "-"],
    ["", (x) => x.name, (x) => (can("admin") ? deleteButton(`network ${x.name}`, `/networks/${encodeURIComponent(x.name)}`, () => list.refresh()) : "")],
  ], { empty: "No networks yet." }));
  list.path = "/networks";
  let form = null;
  if (can("admin")) {
    const name = h("input", { autocomplete: "off", placeholder: "lan" });
    const mode = h("select", {}, h("option", { value: "nat" }, "nat (own bridge, out through the host)"),
      h("option", { value: "isolated" }, "isolated (own bridge, no way out)"), h("option", { value: "bridge" }, "bridge (join a host bridge)"));
    const subnet = h("input", { autocomplete: "off", placeholder: "10.20.0.0/24 (empty: one is chosen)" });
    const uplink = h("input", { autocomplete: "off", placeholder: "bridge mode only: e.g. br0" });
    form = creator("create-network", "Create network", apiForm("net", [
      ["name", "Name", name, ["network name", "already exists", "'user'"]],
      ["mode", "Mode", mode, ["mode"]],
      ["subnet", "Subnet", subnet, ["subnet", "overlaps"]],
      ["uplink", "Uplink", uplink, ["uplink", "host bridge"]],
    ], "Create network", () => api("POST", "/networks", { name: value(name), mode: mode.value, subnet: optional(subnet), uplink: optional(uplink) }, null),
    async (accepted) => {
      name.value = subnet.value = uplink.value = "";
      await following(accepted, `create network ${accepted.network.name}`, list);
    }));
  }
  show(h("h1", {}, "Networks"), form, list);
}

// The image recipes of the shared catalog (corral.cluster.images.RECIPES): the API refuses any other.
const RECIPES = ["tiny", "debian"];

async function imagesPage() {
  const [images, templates] = await Promise.all([api("GET", "/images"), api("GET", "/templates")]);
  const list = liveList("image-list", images, (rows) => dataTable(rows, [
    ["Name", (x) => x.name], ["State", (x) => x.state, (x) => stateTag(x.state)], ["Kind", (x) => x.kind, null, "hide-narrow"],
    ["Source", (x) => x.source, null, "hide-narrow"], ["Size", (x) => x.virtual_size, (x) => size(x.virtual_size)], ["Created", (x) => x.created_at, null, "hide-narrow"],
    ["", (x) => x.name, (x) => (can("admin") ? deleteButton(`image ${x.name}`, `/images/${encodeURIComponent(x.name)}`, () => list.refresh()) : "")],
  ], { empty: "No images yet." }));
  list.path = "/images";
  const templateList = liveList("template-list", templates, (rows) => dataTable(rows, [
    ["Template", (x) => x.name], ["State", (x) => x.state, (x) => stateTag(x.state)], ["From VM", (x) => x.source_vm], ["Image", (x) => x.image],
    ["Memory", (x) => x.memory, (x) => size(x.memory)], ["Used by", (x) => x.used_by.join(" ")],
    ["", (x) => x.name, (x) => (can("admin") ? deleteButton(`template ${x.name}`, `/templates/${encodeURIComponent(x.name)}`, () => templateList.refresh()) : "")],
  ], { filter: false, empty: "No templates: make one from a stopped VM's page." }));
  templateList.path = "/templates";
  let forms = [];
  if (can("admin")) {
    const recipe = h("select", {}, RECIPES.map((x) => h("option", { value: x }, x)));
    const buildName = h("input", { autocomplete: "off", placeholder: "(the recipe's name)" });
    const release = h("input", { autocomplete: "off", placeholder: "debian only: bookworm" });
    const packages = h("input", { autocomplete: "off", placeholder: "debian only: extra packages, space-separated" });
    const diskSize = h("input", { autocomplete: "off", placeholder: "debian only: root disk, e.g. 4G" });
    const build = creator("build-image", "Build from the catalog", apiForm("build", [
      ["recipe", "Recipe", recipe, ["recipe"]],
      ["name", "Name", buildName, ["image name", "already exists"]],
      ["release", "Release", release, ["release"]],
      ["packages", "Packages", packages, ["package"]],
      ["size", "Disk size", diskSize, ["size"]],
    ], "Build", () => {
      const packageList = value(packages).split(/\s+/).filter(Boolean);
      return api("POST", "/images/build", { recipe: recipe.value, name: optional(buildName), release: optional(release),
        packages: packageList.length ? packageList : undefined, size: optional(diskSize) }, null);
    }, async (accepted) => {
      if (!accepted.job) toast(`image ${accepted.image.name} is already built`);
      await following(accepted, `build image ${accepted.image.name}`, list);
    }));
    const importName = h("input", { autocomplete: "off" });
    const file = h("input", { type: "file" });
    const format = h("select", {}, h("option", { value: "" }, "(from the file's content)"), h("option", { value: "qcow2" }, "qcow2"), h("option", { value: "raw" }, "raw"));
    const cloudInit = h("input", { type: "checkbox" });
    const upload = creator("import-image", "Import by upload", apiForm("import", [
      ["name", "Name", importName, ["image name", "already exists"]],
      ["file", "Disk image (qcow2 or raw)", file, ["file", "upload"]],
      ["format", "Format", format, ["format"]],
      ["cloud_init", "Boots with cloud-init", cloudInit, ["cloud"]],
    ], "Upload and import", async () => {
      if (!file.files.length) throw refuse("file: choose the disk image to upload", "pick a .qcow2 or raw file");
      if (!value(importName)) throw refuse("invalid image name '': a name is needed", "use 1-63 lowercase letters, digits or '-'");
      const sent = await api("POST", "/uploads", file.files[0], null);
      try {
        return await api("POST", "/images/import", { name: value(importName), upload: sent.id, format: format.value || undefined, cloud_init: cloudInit.checked }, null);
      } catch (error) {
        await api("DELETE", `/uploads/${sent.id}`, undefined, null).catch(() => null); // refused: nothing is kept
        throw error;
      }
    }, async (accepted) => {
      importName.value = "";
      file.value = "";
      await following(accepted, `import image ${accepted.image.name}`, list);
    }));
    forms = [build, upload];
  }
  show(h("h1", {}, "Images and templates"), h("div", { class: "grid" }, forms), list, h("h2", {}, "Templates"), templateList);
}

async function projectsPage() {
  const list = liveList("project-list", await api("GET", "/projects"), (rows) => dataTable(rows, [
    ["Project", (x) => x.name], ["Description", (x) => x.description, null, "hide-narrow"],
    ["VMs", (x) => x.usage.vms, (x) => `${x.usage.vms} / ${x.max_vms ?? "∞"}`],
    ["vCPUs", (x) => x.usage.vcpus, (x) => `${x.usage.vcpus} / ${x.max_vcpus ?? "∞"}`],
    ["Memory", (x) => x.usage.memory, (x) => `${size(x.usage.memory)} / ${x.max_memory ? size(x.max_memory) : "∞"}`],
    ["Disk", (x) => x.usage.disk, (x) => `${size(x.usage.disk)} / ${x.max_disk ? size(x.max_disk) : "∞"}`]]));
  list.path = "/projects";
  let form = null;
  if (me.cluster && can("admin")) {
    const name = h("input", { autocomplete: "off" });
    const description = h("input", { autocomplete: "off" });
    const maxVms = h("input", { inputmode: "numeric", placeholder: "(no limit)" });
    const maxVcpus = h("input", { inputmode: "numeric", placeholder: "(no limit)" });
    const maxMemory = h("input", { placeholder: "e.g. 16G (empty: no limit)" });
    const maxDisk = h("input", { placeholder: "e.g. 200G (empty: no limit)" });
    form = creator("create-project", "Create project", apiForm("project", [
      ["name", "Name", name, ["project name", "already exists"]],
      ["description", "Description", description, ["description"]],
      ["max_vms", "Most VMs", maxVms],
      ["max_vcpus", "Most vCPUs", maxVcpus],
      ["max_memory", "Most memory", maxMemory],
      ["max_disk", "Most disk", maxDisk],
    ], "Create project", () => api("POST", "/projects", { name: value(name), description: value(description), max_vms: numberOr(maxVms),
      max_vcpus: numberOr(maxVcpus), max_memory: optional(maxMemory), max_disk: optional(maxDisk) }, null),
    async (made) => {
      toast(`project ${made.name} created`);
      for (const control of [name, description, maxVms, maxVcpus, maxMemory, maxDisk]) control.value = "";
      await list.refresh();
      await projectSwitcher();
    }));
  }
  show(h("h1", {}, "Projects"), form, list);
}

async function tokensPage() {
  const [tokens, users, projects] = await Promise.all([api("GET", "/tokens"), api("GET", "/users"), api("GET", "/projects")]);
  const list = liveList("token-list", tokens, (rows) => dataTable(rows, [
    ["Id", (x) => x.id], ["User", (x) => x.user], ["Project", (x) => x.project], ["Role", (x) => x.role],
    ["Description", (x) => x.description, null, "hide-narrow"], ["Expires", (x) => x.expires_at], ["Revoked", (x) => (x.revoked ? "yes" : "no")],
    ["", (x) => x.id, (x) => (x.revoked ? "" : h("button", { type: "button", class: "danger", onclick: async () => {
      if (!confirm(`Revoke token ${x.id} of ${x.user}?`)) return;
      await api("POST", `/tokens/${encodeURIComponent(x.id)}/revoke`, {}, null).catch(fail);
      await list.refresh();
    } }, "Revoke"))]]));
  list.path = "/tokens";
  const userNames = h("datalist", { id: "user-names" }, users.map((x) => h("option", { value: x.name })));
  const user = h("input", { autocomplete: "off", list: "user-names" });
  const inProject = h("select", {}, projects.map((x) => h("option", { value: x.name, selected: x.name === project }, x.name)));
  const role = h("select", {}, ["viewer", "operator", "admin"].map((x) => h("option", { value: x }, x)));
  const expires = h("input", { autocomplete: "off", placeholder: "e.g. 30d, 12h (empty: never)" });
  const description = h("input", { autocomplete: "off" });
  // The secret is in this page once, as text, and never again: the API keeps only its hash.
  const secret = h("div", { id: "token-secret", role: "status" });
  const tokenForm = creator("create-token", "Create token", apiForm("token", [
    ["user", "User", user, ["user"]],
    ["project", "Project", inProject, ["project"]],
    ["role", "Role", role, ["role"]],
    ["expires", "Expires after", expires, ["duration", "expires"]],
    ["description", "Description", description, ["description"]],
  ], "Create token", () => api("POST", "/tokens", { user: value(user), project: inProject.value, role: role.value, expires: optional(expires), description: value(description) }, null),
  async (made) => {
    secret.replaceChildren(h("p", {}, `Token of ${made.user} (${made.role} in ${made.project}). It is shown this once: copy it now.`),
      h("code", { class: "secret" }, made.secret));
    user.value = expires.value = description.value = "";
    await list.refresh();
  }));
  const userName = h("input", { autocomplete: "off" });
  const clusterAdmin = h("input", { type: "checkbox" });
  const userForm = creator("create-user", "Create user", apiForm("user", [
    ["name", "Name", userName, ["user name", "already exists"]],
    ["cluster_admin", "Cluster admin (every project)", clusterAdmin, ["cluster"]],
  ], "Create user", () => api("POST", "/users", { name: value(userName), cluster_admin: clusterAdmin.checked }, null), async (made) => {
    toast(`user ${made.name} created: now make a token for it`);
    userNames.append(h("option", { value: made.name }));
    user.value = made.name;
    userName.value = "";
    clusterAdmin.checked = false;
  }));
  show(h("h1", {}, "Tokens"), userNames, h("div", { class: "grid" }, tokenForm, userForm), secret, list);
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
  [/^#\/networks$/, networksPage],
  [/^#\/images$/, imagesPage],
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
  [/^#\/projects$/, projectsPage],
  [/^#\/tokens$/, tokensPage],
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
      // Keyboard users land on the new content, unless they are already in it (typing in the console, say).
      if (!main.contains(document.activeElement)) main.focus({ preventScroll: true });
      return;
    }
  }
  show(h("h1", {}, "Not found"), h("a", { href: "#/" }, "Dashboard"));
}

// The current project, and a switcher when the caller may see several (GET /projects lists exactly those). The
// choice lasts for the browser tab (sessionStorage: a project's name, no secret), and every page then reads and
// acts in it, with the caller's role there.
async function projectSwitcher() {
  const box = document.getElementById("project-box");
  const projects = await api("GET", "/projects", undefined, null).catch(() => []);
  const names = projects.map((x) => x.name);
  if (!names.includes(project)) project = me.project;
  if (names.length < 2) {
    box.replaceChildren(h("span", { class: "muted", id: "project-current" }, `project ${project}`));
    return;
  }
  const select = h("select", { id: "project", "aria-label": "Project", onchange: () => {
    project = select.value;
    sessionStorage.setItem("corral.project", project);
    // A VM's page names a VM of the project left behind: its list is the place to land in the new one.
    if (/^#\/vm\//.test(location.hash)) location.hash = "#/vms";
    else route();
  } }, names.map((name) => h("option", { value: name, selected: name === project }, name)));
  box.replaceChildren(h("label", { class: "muted" }, "project ", select));
}

async function start() {
  project = sessionStorage.getItem("corral.project") || me.project;
  document.getElementById("top").hidden = false;
  document.getElementById("who").textContent = `${me.user} · ${me.cluster ? "cluster " : ""}${me.role}`;
  document.getElementById("nav").replaceChildren(...PAGES.filter(([, , shown]) => shown()).map(([href, label]) => h("a", { href }, label)));
  await projectSwitcher();
  route();
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("DELETE", "/ui/session", undefined, null).catch(() => null);
  sessionStorage.removeItem("corral.project");
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
