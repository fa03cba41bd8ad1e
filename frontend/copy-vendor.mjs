// Copies the browser builds of the npm packages the web console uses into the directory the daemon serves.
// Nothing third-party is kept in the repository: `make setup` runs `npm ci` and then this.
import { copyFileSync, existsSync, mkdirSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const target = join(here, "..", "src", "corral", "ui", "static", "vendor");
const files = {
  "@xterm/xterm/lib/xterm.js": "xterm.js",
  "@xterm/xterm/css/xterm.css": "xterm.css",
  "@xterm/addon-fit/lib/addon-fit.js": "addon-fit.js",
  "uplot/dist/uPlot.iife.min.js": "uplot.js",
  "uplot/dist/uPlot.min.css": "uplot.css",
};
mkdirSync(target, { recursive: true });
// The directory keeps its own .gitignore, so that a clean rebuild (rm -rf vendor) never lets a copy into git.
const ignore = join(target, ".gitignore");
if (!existsSync(ignore)) {
  writeFileSync(ignore, "# Copied from frontend/node_modules by `make setup` (frontend/copy-vendor.mjs): never kept in the repository.\n*\n!.gitignore\n");
}
for (const [source, name] of Object.entries(files)) {
  copyFileSync(join(here, "node_modules", source), join(target, name));
}
console.log(`copied ${Object.keys(files).length} files into ${target}`);
