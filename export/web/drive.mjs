// Open the sample page in headless Chromium and print what it predicted, as JSON.
//
//   node drive.mjs 'http://127.0.0.1:8000/web/index.html?model=../m.onnx&image=../x.png' [URL...]
//
// Prints one JSON line per URL (the page's window.zmdevice state: status "done" with the
// result (and "results" for several text= parameters), "loaded" when the URL gave a model
// but no input, or "error" with a message). One browser serves all URLs. Uses the system
// Chromium (CHROMIUM env var, default /usr/bin/chromium) through playwright-core, which
// never downloads a browser. With ZMDEVICE_SCREENSHOTS=DIR, saves DIR/page-N.png of each
// page. Exit code 0 when every page finished ("done"), else 1.

import { chromium } from 'playwright-core';

const urls = process.argv.slice(2);
if (urls.length === 0) {
  console.error('usage: node drive.mjs PAGE_URL [PAGE_URL...]');
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
let allDone = true;
try {
  for (const [index, url] of urls.entries()) {
    let state;
    const page = await browser.newPage({ viewport: { width: 820, height: 760 } });
    page.on('console', (message) => console.error(`[page] ${message.text()}`));
    page.on('pageerror', (error) => console.error(`[page error] ${error.message}`));
    try {
      await page.goto(url);
      await page.waitForFunction(
        () => window.zmdevice && ['done', 'loaded', 'error'].includes(window.zmdevice.status),
        null,
        { timeout: Number(process.env.ZMDEVICE_PAGE_TIMEOUT_MS || 60000) },
      );
      state = await page.evaluate(() => window.zmdevice);
      if (process.env.ZMDEVICE_SCREENSHOTS) {
        await page.screenshot({ path: `${process.env.ZMDEVICE_SCREENSHOTS}/page-${index}.png`, fullPage: true });
      }
    } catch (error) {
      state = { status: 'error', error: String(error.message || error) };
    }
    await page.close();
    allDone &&= state.status === 'done';
    console.log(JSON.stringify({ url, ...state }));
  }
} finally {
  await browser.close();
}
process.exit(allDone ? 0 : 1);
