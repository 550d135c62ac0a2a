// Headless Chromium for the browser tests: Debian's Chromium (CHROMIUM, default /usr/bin/chromium)
// driven over CDP by playwright-core, never a downloaded browser, in a throw-away profile.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

/**
 * Launches Chromium in a fresh profile (`bench-race-chromium-<name>…` in the temp dir) and returns
 * `{ ctx, page, profile }`. `page` waits at most `timeout` ms by default; its uncaught errors are
 * pushed onto `pageErrors`, and so is any dialog (dismissed) unless `dialogs` is false.
 */
export async function launchChromium(name, { timeout, pageErrors, viewport = { width: 1280, height: 900 }, dialogs = true }) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), `bench-race-chromium-${name}`));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run', '--disable-sync'],
    viewport,
    timeout: 60000,
  });
  const page = ctx.pages()[0] ?? (await ctx.newPage());
  page.setDefaultTimeout(timeout);
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  if (dialogs) {
    page.on('dialog', (d) => {
      pageErrors.push('unexpected dialog: ' + d.message());
      d.dismiss();
    });
  }
  return { ctx, page, profile };
}

/** Closes what `launchChromium` returned (any part may be missing) and removes its profile. */
export async function closeChromium({ ctx, profile } = {}) {
  await ctx?.close();
  if (profile) fs.rmSync(profile, { recursive: true, force: true });
}
