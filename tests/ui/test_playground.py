"""The playground (GET /) in a real browser: Debian's chromium driven by
Playwright, against a real server on loopback with a tiny model.

Needs the `chromium` executable (Debian: `apt-get install chromium`), or its
path in PTSERVE_CHROMIUM; Playwright downloads no browser."""

import json
import os
import re
import shutil

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from prompt_store.artifact import artifact_bytes
from server.api.routes.playground import CSP
from tests.helpers import live_server, make_adapter, random_prompt

HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>alert(1)</script>", "javascript:alert(1)"]
LABELS = {"pos": " good", "neg": " bad"}


def chromium_path() -> str:
    path = os.environ.get("PTSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("tests/ui need Chromium: apt-get install chromium (or set PTSERVE_CHROMIUM to its path)")
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


def put(server, task_id, artifact):
    r = httpx.put(f"{server.url}/v1/tasks/{task_id}", content=artifact_bytes(artifact))
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def live(gpt2, tmp_path_factory):
    with live_server(gpt2, str(tmp_path_factory.mktemp("store"))) as server:
        put(server, "gen", random_prompt(gpt2, "[P:2]{input}", seed=1))
        put(server, "gen", random_prompt(gpt2, "[P:2]{input}", seed=4))  # version 2
        put(server, "cls", random_prompt(gpt2, "[P:2]{input}[P:1] It was", "classify", LABELS, seed=2))
        hostile = random_prompt(gpt2, f"[P:1]{HOSTILE[0]} {{input}} {HOSTILE[1]} {HOSTILE[2]}[P:1]", "classify",
                                {h: f" {h}" for h in HOSTILE}, seed=3, description=" ".join(HOSTILE))  # fmt: skip
        put(server, "hostile", hostile)
        yield server


@pytest.fixture
def page(browser, live):
    """A fresh page on the playground; every console error and uncaught error is kept in page.problems."""
    context = browser.new_context()
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(live.url + "/")
    expect(page.locator("#tasks li")).to_have_count(3)
    yield page
    context.close()


def choose(page, side, task, version=""):
    """Choose a side's task, then its version ("": the latest) once the versions are listed."""
    page.select_option(f"fieldset[data-side={side}] select[name=task]", task)
    version_choice = page.locator(f"fieldset[data-side={side}] select[name=version]")
    if task in ("", "(hand-written)"):  # no stored task: no version to choose
        expect(version_choice).to_be_hidden()
        return
    if version:
        expect(
            page.locator(f"fieldset[data-side={side}] select[name=version] option[value='{version}']")
        ).to_have_count(1)
    version_choice.select_option(version)


def run(page, a, b="", a_version="", b_version="", **fields):
    choose(page, "a", a, a_version)
    choose(page, "b", b, b_version)
    for name, value in fields.items():
        page.fill(f"#fields textarea[name={name}]", value)
    page.click("#run")
    expect(page.locator("#run")).to_be_enabled()


def test_the_page_loads_with_a_strict_csp_and_no_console_errors(live, page):
    r = httpx.get(live.url + "/")
    assert r.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert httpx.get(live.url + "/ui/app.js").headers["content-security-policy"] == CSP
    assert httpx.get(live.url + "/ui/../settings.py").status_code == 404
    expect(page.locator("#tasks li button")).to_have_text(["cls", "gen", "hostile"])
    expect(page.locator("#model")).to_have_text("model: " + live.app.state.engine.jobs.base_model)
    assert page.problems == []


def test_a_streamed_answer_grows_and_ends_as_the_rest_answer(live, page):
    page.evaluate("""() => { window.changes = 0;
        new MutationObserver(() => window.changes++).observe(document.querySelector('#answer-a'),
            {subtree: true, characterData: true, childList: true}); }""")
    page.click("#sampling summary")  # the sampling controls fold out
    page.fill("#sampling input[name=max_new_tokens]", "24")
    run(page, "gen", input="json parse")
    expect(page.locator("#answer-a .status")).to_contain_text("24 tokens")
    rest = httpx.post(f"{live.url}/v1/tasks/gen/generate", json={"input": "json parse", "max_new_tokens": 24}).json()
    assert page.locator("#answer-a .text").text_content() == rest["text"]
    assert page.evaluate("window.changes") >= 3  # the heading, then text in more than one piece
    assert page.problems == []


def test_classify_bars_show_the_rest_scores_and_two_tasks_answer_side_by_side(live, page):
    run(page, "cls", "gen", input="a sunny day")
    expect(page.locator("#answer-a .bars li")).to_have_count(2)
    rest = httpx.post(f"{live.url}/v1/tasks/cls/classify", json={"input": "a sunny day"}).json()
    shown = {li.get_attribute("data-label"): float(li.get_attribute("data-score"))
             for li in page.locator("#answer-a .bars li").all()}  # fmt: skip
    assert shown == pytest.approx(rest["scores"], rel=1e-9)  # the same request: the same probabilities
    expect(page.locator("#answer-a .label")).to_have_text(f"label: {rest['label']}")
    expect(page.locator("#answer-b h3")).to_have_text("gen (version 2)")
    expect(page.locator("#answer-b .status")).to_contain_text("token")


def test_two_versions_of_one_task_give_their_own_answers_side_by_side(live, page):
    """Side A runs gen's latest version, side B its version 1 (GET .../versions
    lists it): each answer is the REST answer of that version, and they differ."""
    expect(page.locator("#tasks li").filter(has_text="gen")).to_contain_text("generate, version 2 (older kept: 1)")
    page.click("#tasks button[data-task=gen]")
    expect(page.locator("#task-detail")).to_contain_text("2 (latest), 1")
    page.click("#sampling summary")
    page.fill("#sampling input[name=max_new_tokens]", "12")
    run(page, "gen", "gen", b_version="1", input="json parse")
    expect(page.locator("#answer-a h3")).to_have_text("gen (version 2)")
    expect(page.locator("#answer-b h3")).to_have_text("gen (version 1)")
    expect(page.locator("#answer-b .status")).to_contain_text("12 tokens")
    shown = [page.locator(f"#answer-{side} .text").text_content() for side in "ab"]
    rest = [
        httpx.post(
            f"{live.url}/v1/tasks/gen/generate", json={"input": "json parse", "max_new_tokens": 12, **version}
        ).json()  # fmt: skip
        for version in ({}, {"version": 1})
    ]
    assert [r["version"] for r in rest] == [2, 1]
    assert shown == [r["text"] for r in rest] and shown[0] != shown[1]
    assert page.problems == []


def test_a_task_beside_a_hand_written_prompt(live, page):
    """Side B runs words typed in the page (POST /v1/handwritten/generate): its
    answer is the REST answer for the same words."""
    choose(page, "b", "(hand-written)")
    page.fill("#hand input", "Question: what is {input}? Answer:")
    run(page, "gen", "(hand-written)", input="json parse")
    expect(page.locator("#answer-b h3")).to_have_text("hand-written: Question: what is {input}? Answer:")
    expect(page.locator("#answer-b .status")).to_contain_text("token")
    body = {"input": "json parse", "template": "Question: what is {input}? Answer:"}  # the defaults, as the page
    rest = httpx.post(f"{live.url}/v1/handwritten/generate", json=body).json()
    assert page.locator("#answer-b .text").text_content() == rest["text"]
    assert page.problems == []


def test_hostile_strings_from_the_server_show_as_text_and_run_nothing(live, page):
    page.click("#tasks button[data-task=hostile]")
    detail = page.locator("#task-detail").text_content()
    for text in HOSTILE:
        assert text in detail
    run(page, "hostile", input="hello")
    expect(page.locator("#answer-a .bars li")).to_have_count(3)
    assert sorted(li.get_attribute("data-label") for li in page.locator("#answer-a .bars li").all()) == sorted(HOSTILE)
    assert page.locator("#answer-a .bars .name").all_text_contents() != []
    assert page.locator("img").count() == 0 and page.locator("script").count() == 1  # the page's own module
    assert page.dialogs == [] and page.problems == []


def test_uploads_appear_in_the_list_and_a_bad_one_shows_the_servers_words(live, page, gpt2, gpt2_dir, tmp_path):
    good = tmp_path / "good.safetensors"
    good.write_bytes(artifact_bytes(random_prompt(gpt2, "[P:3]{input}", seed=7)))
    page.fill("#upload-form input[name=task]", "uploaded")
    page.set_input_files("#upload-form input[type=file]", str(good))
    page.click("#upload-form button")
    expect(page.locator("#upload-result")).to_have_text("Stored as version 1 of task uploaded.")
    expect(page.locator("#tasks button[data-task=uploaded]")).to_have_count(1)
    make_adapter(gpt2_dir, "PROMPT_TUNING", tmp_path / "peft")
    page.fill("#upload-form input[name=task]", "from-peft")
    page.set_input_files("#upload-form input[type=file]", [str(tmp_path / "peft" / name) for name in (
        "adapter_config.json", "adapter_model.safetensors")])  # fmt: skip
    page.click("#upload-form button")
    expect(page.locator("#upload-result")).to_have_text("Stored as version 1 of task from-peft.")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    said = httpx.put(f"{live.url}/v1/tasks/broken", content=bad.read_bytes()).json()["detail"]
    page.set_input_files("#upload-form input[type=file]", str(bad))
    page.fill("#upload-form input[name=task]", "broken")
    page.click("#upload-form button")
    expect(page.locator("#upload-result")).to_have_text(f"Refused: {said}")
    expect(page.locator("#tasks button[data-task=broken]")).to_have_count(0)
    for task in ("uploaded", "from-peft"):  # the module's other tests count three tasks
        assert httpx.delete(f"{live.url}/v1/tasks/{task}").status_code == 204


def test_the_server_panel_shows_the_model_and_the_load(live, page):
    expect(page.locator("#server-info")).to_contain_text("float32")
    expect(page.locator("#server-info")).to_contain_text(live.app.state.engine.loaded.info["name_or_path"])
    run(page, "gen", input="json parse")
    caption = page.locator("#charts figcaption").first
    expect(caption).to_have_text(re.compile(r"tokens/s: \d+\.\d"), timeout=30_000)  # polled every 2 s
    assert page.locator("#charts polyline").count() == 5 and page.problems == []


def test_a_training_job_runs_to_its_end_with_its_chart_and_another_is_cancelled(browser, gpt2, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"a {'good' if i % 2 else 'bad'} day {i}",
                                        "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(16)))  # fmt: skip
    with live_server(gpt2, str(tmp_path / "store"), api_token="w") as server:
        context = browser.new_context()
        page = context.new_page()
        page.on("dialog", lambda d: d.dismiss())
        page.goto(server.url + "/")
        page.fill("#train-form input[name=task]", "mood")
        page.set_input_files("#train-form input[name=train]", str(data))
        page.fill("#train-form textarea[name=labels]", json.dumps(LABELS))
        page.fill("#train-form input[name=epochs]", "2")
        page.click("#train-start")
        expect(page.locator("#token-dialog")).to_be_visible()  # files and jobs need the write token
        page.fill("#token-input", "w")
        page.click("#token-form button[value=ok]")
        expect(page.locator("#train-status")).to_contain_text("succeeded", timeout=120_000)
        expect(page.locator("#train-chart polyline.train")).to_have_attribute("data-points", "2")
        expect(page.locator("#train-chart polyline.dev")).to_have_attribute("data-points", "3")  # and epoch 0
        expect(page.locator("#train-caption")).to_contain_text("epoch 2:")
        # no manual prompt to beat, and too few dev examples to pick an epoch: the last epoch is stored
        expect(page.locator("#tasks button[data-task=mood]")).to_have_count(1)
        job = httpx.get(f"{server.url}/v1/fine_tuning/jobs", headers={"Authorization": "Bearer w"}).json()["data"][0]
        assert page.locator("#train-status").text_content() == f"job {job['id']}: succeeded, stored as task mood"
        page.fill("#train-form input[name=task]", "forever")
        page.fill("#train-form input[name=epochs]", "1000")
        page.click("#train-start")
        expect(page.locator("#train-status")).to_contain_text("running", timeout=60_000)
        page.click("#train-cancel")
        expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=60_000)
        expect(page.locator("#tasks button[data-task=forever]")).to_have_count(0)
        context.close()


def test_deleting_a_task_asks_first(live, browser, gpt2):
    put(live, "doomed", random_prompt(gpt2, "[P:2]{input}", seed=9))
    context = browser.new_context()
    page = context.new_page()
    answers = iter([False, True])  # the first confirmation is declined, the second accepted
    page.on("dialog", lambda d: d.accept() if next(answers) else d.dismiss())
    page.goto(live.url + "/")
    page.click("#tasks button[data-task=doomed]")
    page.click("#delete-task")
    expect(page.locator("#tasks button[data-task=doomed]")).to_have_count(1)
    assert httpx.get(f"{live.url}/v1/tasks/doomed").status_code == 200  # declined: nothing deleted
    page.click("#delete-task")
    expect(page.locator("#tasks button[data-task=doomed]")).to_have_count(0)
    assert httpx.get(f"{live.url}/v1/tasks/doomed").status_code == 404
    context.close()


def test_a_401_asks_for_the_token_and_then_succeeds(browser, gpt2, tmp_path):
    with live_server(gpt2, str(tmp_path), inference_token="secret-i", api_token="secret-w") as server:
        put_headers = {"Authorization": "Bearer secret-w"}
        body = artifact_bytes(random_prompt(gpt2, "[P:2]{input}", seed=1))
        assert httpx.put(f"{server.url}/v1/tasks/gen", content=body, headers=put_headers).status_code == 201
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#token-dialog")).to_be_visible()  # GET /v1/models answered 401
        page.fill("#token-input", "secret-i")
        page.click("#token-form button[value=ok]")
        expect(page.locator("#model")).to_contain_text("model: ")
        run(page, "gen", input="json parse")
        expect(page.locator("#answer-a .status")).to_contain_text("token")
        assert page.evaluate("sessionStorage.getItem('ptserve-token')") == "secret-i"
        context.close()


def test_docs_render_with_no_request_off_the_host(live, browser):
    context = browser.new_context()
    page = context.new_page()
    elsewhere = []

    def only_here(route):
        if route.request.url.startswith(live.url):
            return route.continue_()
        elsewhere.append(route.request.url)
        return route.abort()

    page.route("**/*", only_here)
    page.goto(live.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("ptserve")
    assert elsewhere == []
    context.close()
    assert json.loads(httpx.get(live.url + "/openapi.json").text)["info"]["title"] == "ptserve"


def test_screenshots_of_the_default_model_at_desktop_and_phone_width(browser, smollm2, default_model_dir, tmp_path):
    """The README's server (the default model, the example tasks): the P-tuned
    `language` task beside its hand-written prompt, which the page fills in
    from the task's training figures (it was trained --from-prompt). The
    pictures go to PTSERVE_SCREENSHOTS when it is set (docs/screenshots/ is
    made that way), else to a temporary folder."""
    from server.api.app import create_app
    from server.settings import Settings
    from tests.helpers import LiveServer

    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "prompts")
    settings = Settings(model=default_model_dir, store=str(tmp_path / "store"), preload=examples)
    out = os.environ.get("PTSERVE_SCREENSHOTS") or str(tmp_path / "shots")
    os.makedirs(out, exist_ok=True)
    with LiveServer(create_app(settings, smollm2)) as server:
        for name, size in (("desktop", {"width": 1280, "height": 900}), ("phone", {"width": 390, "height": 844})):
            context = browser.new_context(viewport=size)
            page = context.new_page()
            page.goto(server.url + "/")
            expect(page.locator("#tasks li")).to_have_count(3)
            page.click("#tasks button[data-task=language]")
            page.click("#sampling summary")
            page.fill("#sampling input[name=max_new_tokens]", "4")
            choose(page, "a", "language")
            choose(page, "b", "(hand-written)")  # prefilled: language's start
            expect(page.locator("#hand input")).to_have_value("The official language of {input} is")
            run(page, "language", "(hand-written)", input="Brazil")
            expect(page.locator("#answer-a .status")).to_contain_text("token")
            expect(page.locator("#answer-b .status")).to_contain_text("token")
            expect(page.locator("#charts figcaption").first).to_have_text(re.compile(r"tokens/s: \d"), timeout=30_000)
            path = os.path.join(out, f"playground-{name}.png")
            page.screenshot(path=path, full_page=True)
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
            context.close()
