// End-to-end test of the web page in headless Chromium: starts the release
// binary on a fresh data directory, then, through the page only: adds
// labelled images, searches and sees the expected item first with the right
// predicted label, verifies a pair, deletes an item, edits a label, labels a
// suggested item, deletes a near-copy, fine-tunes; then, on a
// service with an API key, gives the key when asked. Screenshots of each step
// go to target/browser-artifacts/ (kept as test artefacts).
//
//   node tests/browser/e2e.mjs        (after `cargo build --release`; `make browser-test` does both)

import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { chromium } from "playwright-core";

const root = resolve(import.meta.dirname, "../..");
const fixture = (name) => join(root, "tests/fixtures/fmnist", `${name}.png`);
const artifacts = join(root, "target/browser-artifacts");
mkdirSync(artifacts, { recursive: true });

const freePort = () =>
  new Promise((ok) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });

async function waitHealthy(url) {
  for (let i = 0; i < 600; i++) {
    try {
      if ((await fetch(`${url}/health`)).ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("the service did not become healthy");
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
  console.log(`ok: ${message}`);
}

/// The release binary on a fresh data directory and a free port, with `env` added.
async function startService(env) {
  const dataDir = mkdtempSync(join(tmpdir(), "lookalike-browser-"));
  const port = await freePort();
  // The fixtures are Fashion-MNIST images: the model of that domain, as in tests/api
  // (the general default calls a T-shirt and a trouser "the same" at its threshold).
  const model = join(root, "models/fashion-mnist");
  const args = ["serve", "--port", String(port), "--data-dir", dataDir, "--model", model];
  const process_ = spawn(join(root, "target/release/lookalike"), args, {
    stdio: ["ignore", "ignore", "inherit"],
    env: { ...process.env, RUST_LOG: "warn", ...env },
  });
  return { process: process_, dataDir, url: `http://127.0.0.1:${port}` };
}

/// A graceful stop dumps the index into the data directory: wait for it before removing it.
async function stopService({ process: child, dataDir }) {
  const exited = child.exitCode !== null ? Promise.resolve() : new Promise((ok) => child.once("exit", ok));
  child.kill("SIGTERM");
  await exited;
  rmSync(dataDir, { recursive: true, force: true });
}

const token = `browser-test-${process.pid}-0123456789`;
const service = await startService({ LOOKALIKE_ADMIN_TOKEN: token });
const url = service.url;
let browser;
try {
  await waitHealthy(url);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  for (const [name, viewport] of [["laptop", { width: 1280, height: 800 }], ["phone", { width: 390, height: 844 }]]) {
    const page = await browser.newPage({ viewport });
    const failed = [];
    page.on("requestfailed", (r) => failed.push(r.url()));
    page.on("pageerror", (e) => failed.push(`page error: ${e.message}`));
    await page.goto(url);
    await page.waitForFunction(() => document.getElementById("health").textContent.includes("items"));

    if (name === "laptop") {
      // Add: two T-shirts, then a pair of trousers, each batch with its label.
      await page.click('nav button[data-tab="add"]');
      const batches = [[["tshirt-0", "tshirt-1"], "tshirt"], [["trouser-0", "trouser-1"], "trouser"], [["bag-0"], "bag"],
                       [["sandal-0", "sandal-1", "sandal-2"], "sandal"]];
      for (const [files, label] of batches) {
        await page.setInputFiles("#add-files", files.map(fixture));
        await page.fill("#add-label", label);
        await page.click("#add-submit");
        await page.waitForSelector("#add-status.ok");
      }
      await page.screenshot({ path: join(artifacts, "1-added.png"), fullPage: true });
    }

    // Search with a T-shirt that is not stored: a T-shirt comes first and the prediction says so.
    await page.click('nav button[data-tab="search"]');
    await page.setInputFiles("#search-file", fixture("tshirt-2"));
    await page.waitForSelector("#search-status.ok");
    const first = await page.textContent("#search-results .card:first-child .label");
    check(first === "tshirt", `${name}: the first result is a T-shirt (got ${first})`);
    const prediction = await page.textContent("#search-prediction");
    check(prediction.includes("tshirt"), `${name}: the predicted label is tshirt (${prediction.trim()})`);
    await page.screenshot({ path: join(artifacts, `2-search-${name}.png`), fullPage: true });
    if (name === "laptop") {
      // The heat-map toggle: the query and each of the first 3 results, tinted.
      await page.check("#search-explain");
      await page.setInputFiles("#search-file", fixture("sandal-2"));
      await page.waitForFunction(() => document.querySelectorAll("#search-why canvas").length === 6 &&
        [...document.querySelectorAll("#search-why canvas")].every((c) =>
          c.getContext("2d").getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0)));
      check(true, "the query and the first 3 results are drawn with their heat maps");
      await page.screenshot({ path: join(artifacts, "2b-search-heat-maps.png"), fullPage: true });
      await page.uncheck("#search-explain");
    }

    if (name === "laptop") {
      // Verify: two T-shirts are the same thing, a T-shirt and trousers are not.
      await page.click('nav button[data-tab="verify"]');
      await page.setInputFiles("#verify-a", fixture("tshirt-0"));
      await page.setInputFiles("#verify-b", fixture("tshirt-2"));
      await page.waitForFunction(() => document.getElementById("verify-status").textContent.includes("similarity"));
      check((await page.textContent("#verify-status")).startsWith("the same"), "two T-shirts verify as the same");
      await page.setInputFiles("#verify-b", fixture("trouser-2"));
      await page.waitForFunction(() => document.getElementById("verify-status").textContent.startsWith("different"));
      await page.screenshot({ path: join(artifacts, "3-verify.png"), fullPage: true });
      // The heat-map toggle (keyboard): both images drawn with their maps.
      await page.focus("#verify-explain");
      await page.keyboard.press("Space");
      // Waits for the pixels themselves: the maps are drawn after they are shown.
      await page.waitForFunction(() => !document.getElementById("verify-maps").hidden && ["a", "b"].every((side) => {
        const data = document.getElementById(`verify-map-${side}`).getContext("2d").getImageData(0, 0, 168, 168).data;
        return data.some((v, i) => i % 4 === 0 && v > 0);
      }));
      check(true, "the heat maps are drawn over both images");
      await page.screenshot({ path: join(artifacts, "3b-verify-heat-maps.png"), fullPage: true });

      // Gallery: eight items; delete one (the bag), and it is gone from the page and from the service.
      await page.click('nav button[data-tab="gallery"]');
      await page.waitForSelector("#gallery-items .card");
      check((await page.locator("#gallery-items .card").count()) === 8, "the gallery shows the eight items");
      await page.click('#gallery-items .card[data-id="5"] button');
      await page.waitForSelector("#gallery-status.ok");
      check((await page.locator("#gallery-items .card").count()) === 7, "a deleted item leaves the page");
      const response = await fetch(`${url}/gallery/5`);
      check(response.status === 404, "and the service");
      await page.screenshot({ path: join(artifacts, "4-gallery-after-delete.png"), fullPage: true });
    }
    check(failed.length === 0, `${name}: no failed requests or page errors (${failed.join(", ")})`);
    await page.close();
  }

  // Curation: edit a label in place (and back); then, with an unlabelled trouser
  // and a copy of a stored T-shirt added, label the suggested trouser from the
  // keyboard and delete the copy from its group of near-copies.
  {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    const failed = [];
    page.on("requestfailed", (r) => failed.push(r.url()));
    page.on("pageerror", (e) => failed.push(`page error: ${e.message}`));
    await page.goto(url);
    await page.click('nav button[data-tab="gallery"]');
    const sandal = '#gallery-items .card[data-id="8"] input';
    for (const label of ["sandal-edited", "sandal"]) {
      await page.fill(sandal, label);
      await page.press(sandal, "Enter");
      await page.waitForFunction((l) => document.getElementById("gallery-status").textContent.includes(`"${l}"`), label);
      check((await (await fetch(`${url}/gallery/8`)).json()).label === label, `an inline edit labels item 8 "${label}"`);
      if (label === "sandal-edited") await page.screenshot({ path: join(artifacts, "7-gallery-edit.png"), fullPage: true });
    }

    const add = async (name, label) => {
      const form = new FormData();
      form.append("image", new Blob([readFileSync(fixture(name))], { type: "image/png" }), `${name}.png`);
      if (label) form.append("label", label);
      return (await (await fetch(`${url}/gallery`, { method: "POST", body: form })).json()).items[0].id;
    };
    const trouser = await add("trouser-2", null);
    const copy = await add("tshirt-0", "tshirt");
    await page.click('nav button[data-tab="curate"]');
    await page.click("#suggest");
    const input = `#suggestions input[data-suggested="${trouser}"]`;
    await page.waitForSelector(input);
    check((await page.inputValue(input)) === "trouser", "the unlabelled trouser is suggested, predicted trouser");
    await page.screenshot({ path: join(artifacts, "8-curate-suggestions.png"), fullPage: true });
    await page.focus(input);
    await page.keyboard.press("Enter");
    await page.waitForFunction((id) => document.getElementById("suggest-status").textContent.startsWith(`#${id} labelled`), trouser);
    check((await (await fetch(`${url}/gallery/${trouser}`)).json()).label === "trouser", "Enter labels it");

    await page.fill("#dup-distance", "0.00001");
    await page.click("#dup-scan");
    await page.waitForSelector(`#dup-groups .group[data-keeper="1"] button[data-delete-copy="${copy}"]`);
    await page.screenshot({ path: join(artifacts, "9-curate-duplicates.png"), fullPage: true });
    await page.click(`#dup-groups button[data-delete-copy="${copy}"]`);
    await page.waitForFunction(() => document.getElementById("dup-status").textContent.startsWith("deleted"));
    check((await fetch(`${url}/gallery/${copy}`)).status === 404, "the copy is deleted from its group, the original kept");
    check(failed.length === 0, `curation: no failed requests or page errors (${failed.join(", ")})`);
    await page.close();
  }

  // Admin, last (a committed fine-tune changes the model): type the token, see
  // the versions, start a fine-tune and watch it to its end with its loss chart.
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(url);
  await page.click('nav button[data-tab="admin"]');
  await page.fill("#admin-token", token);
  await page.dispatchEvent("#admin-token", "change");
  await page.waitForSelector("#models-status.ok");
  check((await page.textContent("#models")).includes("active"), "the model versions are listed, one active");
  await page.fill("#ft-epochs", "3");
  await page.click("#ft-start");
  await page.waitForFunction(() => /^(done|failed|cancelled)/.test(document.getElementById("ft-status").textContent), null,
    { timeout: 120_000 });
  const status = await page.textContent("#ft-status");
  check(status.startsWith("done"), `the fine-tune ran to its end (${status})`);
  check((await page.locator("#ft-chart polyline").count()) === 1, "the loss chart is drawn");
  check(/Recall@1 before\d\.\d{3}/.test(await page.textContent("#ft-figures")), "Recall@1 before training is shown");
  await page.screenshot({ path: join(artifacts, "5-admin-finetune.png"), fullPage: true });
  await page.close();

  // With an API key configured, the page asks for it at the first refusal, then works as before
  // (stored images too, which it fetches with the key).
  const key = `browser-test-key-${process.pid}-0123456789`;
  const keyed = await startService({ LOOKALIKE_API_KEY: key });
  try {
    await waitHealthy(keyed.url);
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    let asked = 0;
    page.on("dialog", (dialog) => { asked += 1; dialog.accept(key); });
    await page.goto(keyed.url);
    await page.click('nav button[data-tab="add"]');
    await page.setInputFiles("#add-files", [fixture("bag-0")]);
    await page.fill("#add-label", "bag");
    await page.click("#add-submit");
    await page.waitForSelector("#add-status.ok");
    await page.click('nav button[data-tab="gallery"]');
    await page.waitForFunction(() => document.querySelector("#gallery-items .card img")?.src.startsWith("blob:"));
    // The curation views work with the key too (no second prompt).
    await page.click('nav button[data-tab="curate"]');
    await page.click("#suggest");
    await page.waitForSelector("#suggest-status.ok");
    await page.fill("#dup-distance", "0.001");
    await page.click("#dup-scan");
    await page.waitForSelector("#dup-status.ok");
    check(asked === 1, `the page asked for the API key once (${asked})`);
    check((await fetch(`${keyed.url}/gallery`)).status === 401, "the service refuses a client without the key");
    await page.screenshot({ path: join(artifacts, "6-api-key.png"), fullPage: true });
    await page.close();
  } finally {
    await stopService(keyed);
  }
  console.log(`browser test passed; screenshots in ${artifacts}`);
} finally {
  await browser?.close();
  await stopService(service);
}
