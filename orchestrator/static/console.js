// Tasker console: live updates of the task page (server-sent events), nothing else. The page
// works without this script; with it, DAG nodes and step states change without a reload.
"use strict";
(function () {
  const task = document.getElementById("task");
  if (!task || task.dataset.live !== "true" || !window.EventSource) return;
  const id = task.dataset.task;
  const status = document.getElementById("live-status");
  const setState = (el, prefix, state) => {
    if (!el) return;
    for (const c of Array.from(el.classList)) if (c.startsWith("st-")) el.classList.remove(c);
    el.classList.add("st-" + state);
    if (prefix !== null) el.textContent = state;
  };
  const es = new EventSource("/ui/tasks/" + encodeURIComponent(id) + "/events");
  es.addEventListener("nodes", (ev) => {
    let u;
    try { u = JSON.parse(ev.data); } catch (e) { return; }
    setState(document.getElementById("task-state"), "", u.state);
    task.dataset.state = u.state;
    for (const s of u.steps) {
      const node = document.getElementById("node-" + s.name);
      if (node) {
        setState(node, null, s.state);
        const sub = node.querySelector("text.sub");
        if (sub && s.sub) sub.textContent = s.sub;
        const title = node.querySelector("title");
        if (title) title.textContent = s.name + ": " + s.state;
      }
      const section = document.getElementById("step-" + s.name);
      if (section) {
        section.dataset.state = s.state;
        setState(section.querySelector(".step-state"), "", s.state);
      }
    }
    if (status) status.textContent = "Live: updated " + new Date().toLocaleTimeString() + ".";
  });
  es.addEventListener("end", () => {
    es.close();
    task.dataset.live = "false";
    if (status) {
      status.textContent = "Finished. ";
      const a = document.createElement("a");
      a.href = window.location.pathname;
      a.id = "reload";
      a.textContent = "Reload for outputs and attempts";
      status.appendChild(a);
    }
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED && status) {
      status.textContent = "Live updates unavailable; reload to refresh.";
    }
  };
})();
