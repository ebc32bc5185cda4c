// envctl web: follows a job's state and log, and badges your builds as they end, over the
// HTTP API (same origin, the hub's cookie). Text goes in with textContent: logs and names are
// other people's text. A daemon that is away (503) is waited for, then followed again.
"use strict";
(function () {
  const api = document.body.dataset.api;
  const notice = document.getElementById("notice");

  async function get(path) {
    // The page's _xsrf: the hub's cookie counts for a script's request only with it.
    const resp = await fetch(api + path, {headers: {Accept: "application/json",
                                                    "X-XSRFToken": document.body.dataset.xsrf}});
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      const err = new Error(body && body.error ? body.error.message : resp.statusText);
      err.status = resp.status;
      throw err;
    }
    return body;
  }

  function say(text, kind) {
    if (!text) { notice.hidden = true; return; }
    notice.textContent = text;
    notice.className = "alert alert-" + (kind || "info");
    notice.hidden = false;
  }

  function unavailable(err) {
    if (err.status === 503) say("The envctl daemon is unavailable: " + err.message + " — retrying…", "warning");
    else say(err.message, "danger");
  }

  // -- the job page: state, phases, log ------------------------------------------------------
  const jobEl = document.getElementById("job");
  if (jobEl) {
    const id = encodeURIComponent(jobEl.dataset.id);
    const logEl = document.getElementById("log");
    const phases = document.getElementById("phases");
    const seen = [];
    let offset = 0;
    async function tick() {
      let job;
      try {
        job = await get("jobs/" + id);
        for (;;) {
          const chunk = await get("jobs/" + id + "/logs?offset=" + offset);
          if (chunk.text) logEl.appendChild(document.createTextNode(chunk.text));
          if (chunk.offset === offset) break;
          offset = chunk.offset;
          logEl.scrollTop = logEl.scrollHeight;
        }
        say("");
      } catch (err) {
        unavailable(err);
        setTimeout(tick, 2000);
        return;
      }
      document.getElementById("state").textContent = job.state;
      document.getElementById("state").className = "status status-" + job.state;
      document.getElementById("phase").textContent = job.phase || (job.terminal ? "ended" : "-");
      document.getElementById("detail").textContent = job.exit_detail || "";
      if (job.phase && seen[seen.length - 1] !== job.phase) {
        seen.push(job.phase);
        const li = document.createElement("li");
        li.textContent = job.phase;
        phases.appendChild(li);
      }
      if (job.terminal) {
        const out = document.getElementById("outcome");
        const ok = job.state === "succeeded";
        out.className = "alert alert-" + (ok ? "success" : "danger");
        out.textContent = "";
        const a = document.createElement("a");
        a.href = jobEl.dataset.envUrl;
        a.textContent = jobEl.dataset.name;
        out.append(ok ? "Environment " : "The build of ", a,
                   ok ? " is ready." : " ended: " + job.state + ".");
        out.hidden = false;
        const cancel = document.getElementById("cancel-form");
        if (cancel) cancel.hidden = true;
        return;
      }
      setTimeout(tick, 1000);
    }
    tick();
  }

  // -- every page: a badge for your builds, which says when one ends -------------------------
  const badge = document.getElementById("jobs-badge");
  const active = new Map();  // id -> name of your jobs seen queued or running
  let done = null;  // the last of them seen ending: stays until the next page
  async function poll() {
    try {
      const jobs = await get("jobs?finished=true");
      let running = 0;
      for (const job of jobs) {
        if (!job.terminal) { running++; active.set(job.id, job.name); }
        else if (active.has(job.id)) { done = job; active.delete(job.id); }
      }
      if (done) {
        const ok = done.state === "succeeded";
        badge.textContent = done.name + (ok ? " ready" : " " + done.state);
        badge.className = "badge " + (ok ? "badge-ok" : "badge-bad");
      } else {
        badge.textContent = running + " building";
        badge.className = "badge";
      }
      badge.hidden = !done && !running;
    } catch (err) {
      if (err.status !== 503) return;  // signed out, or refused: nothing to follow
    }
    setTimeout(poll, 2000);
  }
  poll();

  // -- forms that ask first (no inline handlers: the pages' CSP allows none) ----------------
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => { if (!confirm(form.dataset.confirm)) e.preventDefault(); });
  }

  // -- an error page for an unavailable daemon tries again ------------------------------------
  const error = document.getElementById("error");
  if (error && error.dataset.status === "503") {
    setInterval(async () => {
      try { await get("ping"); location.reload(); } catch (err) { /* still away */ }
    }, 2000);
  }
})();
