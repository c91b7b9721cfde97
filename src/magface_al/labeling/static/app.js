// Labelling page: shows one pair at a time and posts each answer to the server.
// The server stores every answer before it replies, so the page keeps no state
// of its own that could be lost; on load it asks the server where to resume.
"use strict";

const ANSWER_KEYS = { s: "same", d: "different", n: "not_sure" };
const ANSWER_NAMES = { same: "same", different: "different", not_sure: "not sure" };

let currentPair = null; // the pair on screen, as /api/state or /api/pairs returns it
let busy = false; // true while a request is in flight, so a held key cannot answer twice
let totalPairs = 0;

const $ = (id) => document.getElementById(id);

async function callApi(path, body) {
  const options = body === undefined
    ? { method: "GET" }
    : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    data = null;
  }
  if (!response.ok) {
    const reason = data && data.error ? data.error : `HTTP ${response.status}`;
    throw new Error(reason);
  }
  return data;
}

function showMessage(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

function renderProgress(view) {
  totalPairs = view.total;
  const percent = view.total ? (100 * view.done) / view.total : 0;
  $("progress-bar").style.width = `${percent.toFixed(1)}%`;
  $("progress-text").textContent = `${view.done} of ${view.total} done`;
  const counts = view.counts;
  $("counts").textContent =
    `same ${counts.same} · different ${counts.different} · not sure ${counts.not_sure}`;
  $("btn-undo").disabled = !view.can_undo;
}

function renderPair(pair) {
  currentPair = pair;
  const pairView = $("pair-view");
  const doneView = $("done-view");
  const answerButtons = document.querySelectorAll("button.answer");
  if (pair === null) {
    pairView.hidden = true;
    doneView.hidden = false;
    answerButtons.forEach((button) => { button.disabled = true; });
    delete document.body.dataset.pairIndex;
    return;
  }
  doneView.hidden = true;
  pairView.hidden = false;
  $("image1").src = pair.image1_url;
  $("image2").src = pair.image2_url;
  $("caption1").textContent = `image ${pair.key1}`;
  $("caption2").textContent = `image ${pair.key2}`;
  $("pair-label").textContent = `Pair ${pair.index + 1} of ${totalPairs}` +
    (pair.answer ? ` · answered: ${ANSWER_NAMES[pair.answer]}` : "");
  answerButtons.forEach((button) => {
    button.disabled = false;
    button.classList.toggle("chosen", button.dataset.answer === pair.answer);
  });
  document.body.dataset.pairIndex = String(pair.index);
}

function preload(pairs) {
  for (const pair of pairs) {
    new Image().src = pair.image1_url;
    new Image().src = pair.image2_url;
  }
}

function render(view, pair) {
  renderProgress(view);
  renderPair(pair);
  preload(view.upcoming || []);
  $("feedback-file").textContent = view.feedback_file;
  document.body.dataset.done = String(view.done);
}

async function withBusy(action) {
  if (busy) {
    return;
  }
  busy = true;
  document.body.classList.add("busy");
  try {
    await action();
  } catch (error) {
    showMessage(`Not saved: ${error.message}. Check that the server is running, then try again.`, true);
  } finally {
    busy = false;
    document.body.classList.remove("busy");
  }
}

function answer(name) {
  if (currentPair === null) {
    return Promise.resolve();
  }
  const pair = currentPair;
  return withBusy(async () => {
    const view = await callApi("/api/answers", {
      pair: pair.index, key1: pair.key1, key2: pair.key2, answer: name,
    });
    render(view, view.pair);
    showMessage(`Saved pair ${pair.index + 1}: ${ANSWER_NAMES[name]}.`);
  });
}

function undo() {
  return withBusy(async () => {
    const view = await callApi("/api/undo", {});
    if (view.undone === null) {
      render(view, view.pair);
      showMessage("Nothing to undo.");
      return;
    }
    // Show the pair whose answer was withdrawn, so it can be answered again.
    const pair = await callApi(`/api/pairs/${view.undone}`);
    render(view, pair);
    showMessage(`Undid the answer to pair ${view.undone + 1}.`);
  });
}

function load() {
  return withBusy(async () => {
    const view = await callApi("/api/state");
    render(view, view.pair);
    showMessage(view.done ? `Resumed: ${view.done} pairs already answered.` : "");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button.answer").forEach((button) => {
    button.addEventListener("click", () => answer(button.dataset.answer));
  });
  $("btn-undo").addEventListener("click", () => undo());
  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    const key = event.key.toLowerCase();
    if (key in ANSWER_KEYS) {
      event.preventDefault();
      answer(ANSWER_KEYS[key]);
    } else if (key === "u") {
      event.preventDefault();
      undo();
    }
  });
  load();
});
