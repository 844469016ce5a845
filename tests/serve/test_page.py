"""The chat page in a real browser: headless Chromium driven by Selenium, against the real
server on a loopback port.

It loads under its content security policy with no console error; it streams an answer
and sends the whole conversation with the settings; a reply made of HTML is shown as
text (no element made, no script run); Stop cancels an answer and frees the slot; a
server with a key asks for it and then works; a refusal's message is shown.

Needs selenium (the dev extra) and Debian's chromium + chromedriver, which
scripts/install_browser.sh installs (scripts/test.sh runs it); skipped without them.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (pip install -e '.[dev]')")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

from fragment_llm.checkpoint.trained import load_trained  # noqa: E402
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ServeConfig, TokenizerConfig  # noqa: E402
from fragment_llm.serve import guard  # noqa: E402
from fragment_llm.serve.run import Running, ServeRequest, serving_in_thread  # noqa: E402
from fragment_llm.tokenizer.tokenizer import Tokenizer  # noqa: E402
from tests.helpers import save_scripted, scripted_answer, scripted_model  # noqa: E402
from tests.serve.conftest import API_KEY, CHAT_ANSWER, serve_model  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TIMEOUT_S = 10  # any one wait, page load or browser command
TITLE = "Fragment chat"
# Markup that would make elements, and run script, if the page inserted it as HTML.
HOSTILE_ANSWER = "<img src=x onerror=window.pwned=1><script>document.title+=2</SCRIPT>"
T = TypeVar("T")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module (starting one takes a second or two)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed: run "
                    "scripts/install_browser.sh (Debian: apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-extensions", "--disable-background-networking", "--no-first-run",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.command_executor.client_config.timeout = TIMEOUT_S * 3
    driver.set_page_load_timeout(TIMEOUT_S)
    driver.set_script_timeout(TIMEOUT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat_server(chat_checkpoint) -> Iterator[Running]:
    with serve_model(chat_checkpoint) as server:
        yield server


def wait_for(browser: WebDriver, condition: Callable[[WebDriver], T]) -> T:
    return WebDriverWait(browser, TIMEOUT_S, poll_frequency=0.05).until(condition)


def element(browser: WebDriver, element_id: str):
    return browser.find_element(By.ID, element_id)


def open_page(browser: WebDriver, url: str, connected: bool = True) -> None:
    browser.get_log("browser")  # reading the log empties it: what an earlier test left
    browser.get(f"{url}/")
    if connected:
        wait_for(browser, lambda b: element(b, "model-id").text not in ("", "connecting…"))


def ask(browser: WebDriver, text: str) -> None:
    element(browser, "message").send_keys(text)
    element(browser, "send").click()


def answers(browser: WebDriver) -> list[str]:
    found = browser.find_elements(By.CSS_SELECTOR, "#log .assistant .words")
    return [words.text for words in found]


def finished(browser: WebDriver) -> bool:
    """The page is idle again: Send enabled, no answer streaming."""
    return (element(browser, "send").is_enabled()
            and not browser.find_elements(By.CSS_SELECTOR, "#log .streaming"))


def record_requests(browser: WebDriver) -> None:
    """Keep the JSON body of every fetch the page makes, in window.sentBodies."""
    browser.execute_script("""
        const original = window.fetch;
        window.sentBodies = [];
        window.fetch = (url, options) => {
            if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
            return original(url, options);
        };""")


def console_errors(browser: WebDriver) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE"]


# ------------------------------------------------------------------------------ tests


def test_page_loads_under_its_policy_without_console_errors(browser, chat_server):
    with urllib.request.urlopen(f"{chat_server.url}/", timeout=TIMEOUT_S) as response:  # noqa: S310 (loopback)
        assert response.headers["content-security-policy"] == guard.PAGE_POLICY
    open_page(browser, chat_server.url)
    assert browser.title == TITLE
    assert element(browser, "model-id").text == "chat"  # chat.js ran under the policy
    assert element(browser, "key-form").is_displayed() is False
    assert element(browser, "log").get_attribute("aria-live") == "polite"
    assert console_errors(browser) == []


def test_streams_the_answer_and_sends_the_whole_conversation(browser, chat_server):
    open_page(browser, chat_server.url)
    record_requests(browser)
    element(browser, "settings").click()
    element(browser, "system").send_keys("Be brief.")
    element(browser, "temperature").send_keys("0")
    element(browser, "max-tokens").send_keys("20")
    ask(browser, "hello there")
    wait_for(browser, lambda b: finished(b) and answers(b) == [CHAT_ANSWER])
    ask(browser, "and you?")
    wait_for(browser, lambda b: finished(b) and answers(b) == [CHAT_ANSWER, CHAT_ANSWER])

    last = browser.execute_script("return window.sentBodies")[-1]
    assert last["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": CHAT_ANSWER},
        {"role": "user", "content": "and you?"}]
    assert (last["stream"], last["temperature"], last["max_tokens"]) == (True, 0, 20)
    assert console_errors(browser) == []

    element(browser, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log li") == []


def test_a_refusal_shows_the_servers_message_and_gives_the_question_back(browser, chat_server):
    open_page(browser, chat_server.url)
    element(browser, "settings").click()
    element(browser, "max-tokens").send_keys("4000")  # over the server's cap of 256
    ask(browser, "a long one")
    error = wait_for(browser, lambda b: element(b, "error").is_displayed()
                     and element(b, "error"))
    assert "max_tokens: 4,000 is over this server's cap of 256" in error.text
    assert element(browser, "message").get_attribute("value") == "a long one"
    assert browser.find_elements(By.CSS_SELECTOR, "#log li") == []


@pytest.fixture(scope="module")
def hostile_chat_checkpoint(tmp_path_factory) -> Path:
    """A chat model that answers HOSTILE_ANSWER, with a tokenizer trained on it so that
    each of its tokens occurs once (the scripted model's rule)."""
    folder = tmp_path_factory.mktemp("hostile-chat")
    tokenizer = Tokenizer.train([f"{HOSTILE_ANSWER}\n" * 10],
                                TokenizerConfig(vocab_size=320, workers=1))
    tokenizer.save(folder / "tokenizer.json")
    model = scripted_answer(tokenizer, HOSTILE_ANSWER)
    return save_scripted(folder / "run", model, folder / "tokenizer.json",
                         chat_format=SPECIAL_TOKENS_CHAT_FORMAT)


def test_markup_in_a_reply_is_shown_as_text_and_never_runs(browser, hostile_chat_checkpoint):
    with serve_model(hostile_chat_checkpoint) as server:
        open_page(browser, server.url)
        ask(browser, "say something nasty")
        wait_for(browser, lambda b: finished(b) and answers(b))
        assert answers(browser) == [HOSTILE_ANSWER]

        made = browser.execute_script("""return {
            inLog: document.querySelectorAll('#log img, #log script, #log *[onerror]').length,
            images: document.images.length,
            scripts: document.scripts.length,
            pwned: typeof window.pwned,
        };""")
        assert made == {"inLog": 0, "images": 0, "scripts": 1, "pwned": "undefined"}
        assert browser.title == TITLE
        assert console_errors(browser) == []


@contextlib.contextmanager
def slow_endless_server(tokenizer_file: Path, folder: Path, seconds_per_token: float,
                        **settings: object) -> Iterator[Running]:
    """A chat model that says `x` forever, one token per `seconds_per_token`."""
    tokenizer = Tokenizer.load(tokenizer_file)
    (x,) = tokenizer.encode("x")
    path = save_scripted(folder, scripted_model(tokenizer.vocab_size, {}, x), tokenizer_file,
                         chat_format=SPECIAL_TOKENS_CHAT_FORMAT)
    trained = load_trained(path)
    trained.model.register_forward_pre_hook(lambda *_: time.sleep(seconds_per_token))
    config = ServeConfig.model_validate({"port": 0, "access_log": False, **settings})
    request = ServeRequest(trained.model, trained.tokenizer, SPECIAL_TOKENS_CHAT_FORMAT, path,
                           0, config, None)
    with serving_in_thread(request) as running:
        yield running


def wait_until_idle(server: Running) -> None:
    pool = server.app.state.routes.served.pool
    deadline = time.monotonic() + TIMEOUT_S
    while pool.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.busy == 0, "the slot was not freed after Stop"


def test_stop_cancels_the_answer_and_frees_the_slot(browser, chat_tokenizer, tmp_path):
    # One slot and no queue: had Stop left the slot taken, the second question gets 429.
    with slow_endless_server(chat_tokenizer, tmp_path / "run", 0.01, slots=1, queue=0,
                             max_new_tokens=4096, max_time_s=30) as server:
        open_page(browser, server.url)
        for question in ("go on", "again"):
            ask(browser, question)
            wait_for(browser, lambda b: len(answers(b)[-1]) >= 5)
            element(browser, "stop").click()
            wait_for(browser, finished)
            wait_until_idle(server)
            assert answers(browser)[-1].startswith("xxxxx")
            assert browser.find_elements(By.CSS_SELECTOR, "#log .assistant .note")[-1].text \
                == "(stopped)"
            assert element(browser, "status").text == "Stopped."
        assert element(browser, "error").is_displayed() is False


def test_a_server_with_a_key_asks_for_it_and_then_answers(browser, chat_checkpoint):
    with serve_model(chat_checkpoint, api_key=API_KEY) as server:
        open_page(browser, server.url, connected=False)
        wait_for(browser, lambda b: element(b, "key-form").is_displayed())
        assert "incorrect or missing API key" in element(browser, "error").text

        element(browser, "api-key").send_keys("wrong-key-0123456789\n")
        wait_for(browser, lambda b: element(b, "key-form").is_displayed())
        element(browser, "api-key").send_keys(API_KEY + "\n")
        wait_for(browser, lambda b: element(b, "model-id").text == "chat")
        assert element(browser, "key-form").is_displayed() is False

        ask(browser, "hello there")
        wait_for(browser, lambda b: finished(b) and answers(b) == [CHAT_ANSWER])
        storage = browser.execute_script(
            "return [sessionStorage.getItem('fragment-api-key'), localStorage.length]")
        assert storage == [API_KEY, 0]
