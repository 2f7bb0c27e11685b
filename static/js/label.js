// The labeling page's island (templates/partials/_label_task.html): the ranking
// board (SortableJS), keyboard labeling, and the ranking-vs-ratings warning.
// It works on whatever #label-task is in the page, so it keeps working after
// htmx swaps in the next task.
//
// Keyboard (also written on the page):
//   A..I       select a response
//   1..K       rank mode (default): put the selected response in that rank slot;
//              the same number for two responses is a tie. 0 unranks it. A set
//              with top-k ranking has slots 1..k only (data-top-k); the
//              responses left unranked are tied last.
//   R          toggle rate mode: 1..7 set the selected response's rating
//   after a number the next response is selected, so "1 2 2 3" ranks A..D
//   X          "all responses are unacceptable": ticks the box, clears the ranking
//              and puts the cursor in the reason field; X again (outside a text
//              field) takes it back
//   Escape     clear the selection (in a text field: leave the field)
//   Ctrl+Enter submit
//
// On the A/B page of a pairwise task (data-mode="vote", _label_vote.html):
//   1 A is better, 2 B is better, 3 tie, 4 both bad
//   S / C / M  slightly / clearly / much better (optional; pressing it again clears it)
//   Enter or Ctrl+Enter submit
(() => {
  "use strict";
  const LETTERS = "ABCDEFGHI";
  const state = { mode: "rank", selected: null };

  const root = () => document.getElementById("label-task");
  const form = () => document.getElementById("label-form");
  const cards = (r) => Array.from(r.querySelectorAll(".response"));
  const card = (r, id) => r.querySelector(`.response[data-response-id="${id}"]`);
  const chip = (r, id) => r.querySelector(`.rank-chip[data-response-id="${id}"]`);
  // Rank slots on the board: K, or the set's top k.
  const slots = (r) => Number(r.dataset.topK) || cards(r).length;

  function readRatings(r) {
    const out = {};
    for (const c of cards(r)) {
      const checked = r.querySelector(`input[name="rating-${c.dataset.responseId}"]:checked`);
      if (checked) out[c.dataset.responseId] = Number(checked.value);
    }
    return out;
  }

  function readRanks(r) {
    const out = {};
    for (const c of cards(r)) {
      const value = r.querySelector(`input[name="rank-${c.dataset.responseId}"]`).value;
      if (/^[1-9]$/.test(value)) out[c.dataset.responseId] = Number(value);
    }
    return out;
  }

  // The same rule as app/services/annotations.ranking_contradictions.
  function warn(r) {
    const box = r.querySelector("#rank-warning");
    if (!box) return;
    const ratings = readRatings(r), ranks = readRanks(r);
    const ids = Object.keys(ranks).map(Number).sort((a, b) => a - b);
    const lines = [];
    for (const x of ids) {
      for (const y of ids) {
        if (x === y || !(x in ratings) || !(y in ratings)) continue;
        if (ratings[x] > ratings[y] && ranks[x] > ranks[y]) {
          const lx = card(r, x).dataset.letter, ly = card(r, y).dataset.letter;
          lines.push(`${lx} is rated higher than ${ly} (${ratings[x]} vs ${ratings[y]}) but ranked below it (${ranks[x]} vs ${ranks[y]}).`);
        }
      }
    }
    box.replaceChildren();
    if (!lines.length) return;
    const head = document.createElement("strong");
    head.textContent = "The ranking contradicts the ratings (you can still submit): ";
    box.append(head, lines.join(" "));
  }

  // Hidden rank inputs and the "Rank" shown on each card follow the board.
  function sync(r) {
    for (const list of r.querySelectorAll(".rank-list")) {
      const chips = Array.from(list.children).sort((a, b) => a.textContent.localeCompare(b.textContent));
      for (const c of chips) list.appendChild(c);
    }
    for (const c of r.querySelectorAll(".rank-chip")) {
      const rank = c.closest(".rank-slot").dataset.rank;
      const id = c.dataset.responseId;
      r.querySelector(`input[name="rank-${id}"]`).value = rank;
      const shown = card(r, id).querySelector(".rank-value");
      if (shown) shown.textContent = rank || "–";
    }
    warn(r);
  }

  function select(r, id) {
    state.selected = id == null ? null : String(id);
    for (const el of r.querySelectorAll(".response, .rank-chip")) {
      el.classList.toggle("selected", el.dataset.responseId === state.selected);
    }
    if (state.selected) card(r, state.selected).scrollIntoView({ block: "nearest" });
  }

  function setMode(r, mode) {
    state.mode = mode;
    const box = r.querySelector("#label-mode");
    if (!box) return;
    box.classList.toggle("rate", mode === "rate");
    box.innerHTML = mode === "rate"
      ? "Mode: <strong>rate</strong> (1–7 set the rating; R for rank)"
      : "Mode: <strong>rank</strong>";
  }

  function setRank(r, id, rank) {
    const list = r.querySelector(rank ? `.rank-slot[data-rank="${rank}"] .rank-list` : ".rank-pool .rank-list");
    list.appendChild(chip(r, id));
    if (rank) setAllBad(r, false);  // ranking a response takes "all bad" back
    sync(r);
  }

  // "All bad": no ranking goes with it, so the board is emptied; the reason is asked for.
  // Without this script the reason field is always shown; with it, only once "all bad" is ticked.
  function showAllBad(r, on) {
    r.querySelector("#ranking").classList.toggle("all-bad-on", on);
    r.querySelector("#all-bad-reason-label").hidden = !on;
  }

  function setAllBad(r, on, focus) {
    const box = r.querySelector("#all-bad-check");
    if (!box) return;
    box.checked = on;
    showAllBad(r, on);
    if (!on) return;
    const pool = r.querySelector(".rank-pool .rank-list");
    for (const c of r.querySelectorAll(".rank-slot:not(.rank-pool) .rank-chip")) pool.appendChild(c);
    sync(r);
    if (focus) r.querySelector("#all-bad-reason").focus();
  }

  function setRating(r, id, value) {
    const input = r.querySelector(`input[name="rating-${id}"][value="${value}"]`);
    input.checked = true;
    warn(r);
  }

  function advance(r) {
    const all = cards(r);
    const at = all.findIndex((c) => c.dataset.responseId === state.selected);
    select(r, all[(at + 1) % all.length].dataset.responseId);
  }

  const VOTES = { 1: "a", 2: "b", 3: "tie", 4: "both_bad" };
  const STRENGTHS = { S: "slightly", C: "clearly", M: "much" };

  function check(r, name, value) {
    const input = r.querySelector(`input[name="${name}"][value="${value}"]`);
    if (!input) return;
    input.checked = !(name === "strength" && input.checked);
    input.focus({ preventScroll: true });
    if (name === "vote" && (value === "tie" || value === "both_bad")) {
      // A tie has no strength.
      for (const s of r.querySelectorAll('input[name="strength"]')) s.checked = false;
    }
  }

  function onVoteKey(event, r, f) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.length === 1 ? event.key.toUpperCase() : event.key;
    if (key in VOTES) {
      event.preventDefault();
      check(r, "vote", VOTES[key]);
    } else if (key in STRENGTHS) {
      event.preventDefault();
      check(r, "strength", STRENGTHS[key]);
    } else if (key === "Enter" && !(event.target instanceof Element && event.target.closest("button, a, summary"))) {
      event.preventDefault();
      f.requestSubmit();
    }
  }

  function onKey(event) {
    const r = root(), f = form();
    if (!r || !f) return;
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      f.requestSubmit();
      return;
    }
    const target = event.target;
    if (target instanceof Element && target.closest("textarea, select, input[type=text], [contenteditable]")) {
      if (event.key === "Escape") target.blur();
      return;
    }
    if (r.dataset.mode === "vote") {
      onVoteKey(event, r, f);
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const all = cards(r);
    const key = event.key.length === 1 ? event.key.toUpperCase() : event.key;
    const letter = key.length === 1 ? LETTERS.indexOf(key) : -1;
    if (letter >= 0 && letter < all.length) {
      event.preventDefault();
      select(r, all[letter].dataset.responseId);
    } else if (key === "R") {
      event.preventDefault();
      setMode(r, state.mode === "rank" ? "rate" : "rank");
    } else if (key === "X") {
      event.preventDefault();
      const box = r.querySelector("#all-bad-check");
      if (box) setAllBad(r, !box.checked, true);
    } else if (key === "Escape") {
      select(r, null);
    } else if (/^[0-9]$/.test(key)) {
      const n = Number(key);
      if (state.mode === "rate" ? n < 1 || n > 7 : n > slots(r)) return;
      event.preventDefault();
      if (!state.selected) select(r, all[0].dataset.responseId);
      if (state.mode === "rate") setRating(r, state.selected, n);
      else setRank(r, state.selected, n === 0 ? "" : String(n));
      advance(r);
    }
  }

  function init(elt) {
    const r = elt.id === "label-task" ? elt : elt.querySelector && elt.querySelector("#label-task");
    if (!r || r.dataset.ready) return;
    r.dataset.ready = "1";
    state.selected = null;
    if (window.Sortable) {
      for (const list of r.querySelectorAll(".rank-list")) {
        // One shared group: a response can go to any slot, and a slot can hold several (a tie).
        // forceFallback: Sortable's own pointer-event dragging, the same on mouse, touch
        // and pen (native HTML5 drag and drop differs between browsers).
        Sortable.create(list, {
          group: `ranks-${r.dataset.taskId}`, animation: 120, forceFallback: true,
          onEnd: (event) => {
            if (event.to.closest(".rank-slot:not(.rank-pool)")) setAllBad(r, false);
            sync(r);
          },
        });
      }
    }
    r.addEventListener("change", (event) => {
      if (event.target.id === "all-bad-check") setAllBad(r, event.target.checked, event.target.checked);
      warn(r);
    });
    r.addEventListener("click", (event) => {
      const picked = event.target.closest(".response, .rank-chip");
      if (picked) select(r, picked.dataset.responseId);
    });
    if (r.dataset.mode !== "vote") {
      setMode(r, "rank");
      const allBad = r.querySelector("#all-bad-check");
      if (allBad) showAllBad(r, allBad.checked);
      sync(r);
    }
    if (elt !== document.body) r.scrollIntoView({ block: "start" });
  }

  document.addEventListener("keydown", onKey);
  htmx.onLoad(init);
})();
