// The chat page's script: it keeps the conversation, sends it to POST /v1/chat/completions
// with "stream": true, and shows the answer as its server-sent events arrive.
//
// Everything that comes from the model or the server (answers, error messages, the model
// id) is put on the page as text (textContent, Text nodes), never parsed as HTML: a reply
// holding <script> or <img onerror=...> shows those characters. The page's content
// security policy would also stop such markup from running; this is the first wall.
//
// The API key, when the server asks for one (401), lives in sessionStorage: this tab only,
// gone when it closes, never in localStorage or a cookie.
"use strict";

(() => {
  const KEY_STORAGE = "fragment-api-key";
  const page = {
    log: byId("log"), message: byId("message"), send: byId("send"), stop: byId("stop"),
    newChat: byId("new-chat"), modelId: byId("model-id"), status: byId("status"),
    error: byId("error"), keyForm: byId("key-form"), apiKey: byId("api-key"),
    settings: byId("settings"), system: byId("system"), temperature: byId("temperature"),
    maxTokens: byId("max-tokens"), composer: byId("composer"),
  };
  const chat = {
    model: null,       // the id /v1/models lists
    turns: [],         // {role: "user" | "assistant", content} in order
    controller: null,  // the AbortController of the answer being streamed
    epoch: 0,          // bumped by New chat, so a late answer does not land in a new chat
  };

  /** A refusal from the server: its message (OpenAI error shape) and HTTP status. */
  class Refusal extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function byId(id) {
    return document.getElementById(id);
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    return key ? { authorization: `Bearer ${key}` } : {};
  }

  /** The server's message for a non-200 response, read as JSON, else the status line. */
  async function refusal(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") {
        message = body.error.message;
      }
    } catch (_) {
      // not JSON (a proxy's page, say): the status line will do
    }
    return new Refusal(message, response.status);
  }

  // ------------------------------------------------------------------ the model and key

  async function loadModel() {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) throw await refusal(response);
    const body = await response.json();
    const first = body && Array.isArray(body.data) ? body.data[0] : null;
    if (!first || typeof first.id !== "string") {
      throw new Refusal("the server lists no model", response.status);
    }
    chat.model = first.id;
    page.modelId.textContent = first.id;
    return first.id;
  }

  async function connect() {
    try {
      await loadModel();
      clearError();
    } catch (err) {
      page.modelId.textContent = "not connected";
      showFailure(err);
    }
  }

  function askForKey() {
    page.keyForm.hidden = false;
    page.apiKey.focus();
  }

  function useKey(event) {
    event.preventDefault();
    const key = page.apiKey.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    page.apiKey.value = "";
    page.keyForm.hidden = true;
    connect();
  }

  // ------------------------------------------------------------------------ messages

  /** A turn on the page: its list item and the Text node its words go into. */
  function addTurn(role, content) {
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const words = document.createElement("p");
    words.className = "words";
    const text = document.createTextNode(content);
    words.append(text);
    item.append(who, words);
    page.log.append(item);
    page.log.scrollTop = page.log.scrollHeight;
    return { item, text };
  }

  /** Makes `change` to the conversation, keeping its end in view if it was: a reader
   * who scrolled up to read is not pulled down by every new word. */
  function following(change) {
    const log = page.log;
    const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
    change();
    if (atEnd) log.scrollTop = log.scrollHeight;
  }

  function addNote(turn, note) {
    const small = document.createElement("span");
    small.className = "note";
    small.textContent = note;
    following(() => turn.item.append(small));
  }

  function showFailure(err) {
    const status = err instanceof Refusal ? err.status : 0;
    const message = err instanceof Refusal ? err.message : `the request failed: ${err.message || err}`;
    page.error.textContent = message;
    page.error.hidden = false;
    if (status === 401) askForKey();
  }

  function clearError() {
    page.error.textContent = "";
    page.error.hidden = true;
  }

  function setStatus(text) {
    page.status.textContent = text;
  }

  // ------------------------------------------------------------------------- sending

  /** The request body: the system prompt, the conversation, and the settings set. */
  function requestBody(model) {
    const messages = [];
    const system = page.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...chat.turns);
    const body = { model, messages, stream: true };
    if (page.temperature.value !== "") body.temperature = Number(page.temperature.value);
    if (page.maxTokens.value !== "") body.max_tokens = Number(page.maxTokens.value);
    return body;
  }

  /** Reads `data: ...` events until `data: [DONE]`; returns the finish reason. */
  async function readEvents(body, onText) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Refusal("the answer ended before the server said it was done", 0);
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;  // blank separators, comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          reader.cancel().catch(() => {});
          return finish;
        }
        const event = JSON.parse(data);
        if (event.error) throw new Refusal(String(event.error.message), 200);
        const choice = event.choices && event.choices[0];
        if (!choice) continue;  // the usage chunk
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }

  function setBusy(controller) {
    chat.controller = controller;
    page.send.disabled = controller !== null;
    page.stop.disabled = controller === null;
  }

  function settingsValid() {
    for (const field of [page.temperature, page.maxTokens]) {
      if (!field.checkValidity()) {
        page.settings.open = true;
        field.reportValidity();
        return false;
      }
    }
    return true;
  }

  async function send(event) {
    event.preventDefault();
    const content = page.message.value;
    if (!content.trim() || chat.controller || !settingsValid()) return;
    const epoch = chat.epoch;
    const controller = new AbortController();
    page.message.value = "";
    clearError();
    chat.turns.push({ role: "user", content });
    const asked = addTurn("user", content);
    const answer = addTurn("assistant", "");
    answer.item.classList.add("streaming");
    setBusy(controller);
    setStatus("Answering…");
    let said = "";
    try {
      const model = chat.model || (await loadModel());
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { ...authHeaders(), "content-type": "application/json" },
        body: JSON.stringify(requestBody(model)),
        signal: controller.signal,
      });
      if (!response.ok) throw await refusal(response);
      const finish = await readEvents(response.body, (piece) => {
        said += piece;
        following(() => answer.text.appendData(piece));
      });
      if (finish === "length") addNote(answer, "(cut off: the token limit)");
      setStatus("");
    } catch (err) {
      if (epoch !== chat.epoch) return;  // New chat was pressed: this answer is gone
      const stopped = controller.signal.aborted;
      setStatus(stopped ? "Stopped." : "");
      if (!said) {
        // Nothing was answered: take the question back, so it can be sent again.
        chat.turns.pop();
        asked.item.remove();
        answer.item.remove();
        if (!page.message.value) page.message.value = content;
      } else {
        addNote(answer, stopped ? "(stopped)" : "(failed)");
      }
      if (!stopped) showFailure(err);
    } finally {
      if (epoch === chat.epoch) {
        answer.item.classList.remove("streaming");
        if (said) chat.turns.push({ role: "assistant", content: said });
        setBusy(null);
      }
    }
  }

  function stop() {
    if (chat.controller) chat.controller.abort();
  }

  function newChat() {
    stop();
    chat.epoch += 1;
    chat.turns = [];
    page.log.replaceChildren();
    setBusy(null);
    setStatus("");
    clearError();
    page.message.focus();
  }

  function sendOnEnter(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      page.composer.requestSubmit();
    }
  }

  page.composer.addEventListener("submit", send);
  page.message.addEventListener("keydown", sendOnEnter);
  page.stop.addEventListener("click", stop);
  page.newChat.addEventListener("click", newChat);
  page.keyForm.addEventListener("submit", useKey);
  connect();
})();
