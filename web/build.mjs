// Bundles the islands in src/ into dist/ (what the control plane embeds at `cargo build`).
//   npm run build            production bundles (minified)
//   npm run build -- --dev   readable bundles with inline source maps
import { build } from 'esbuild';
import { rmSync } from 'node:fs';

const dev = process.argv.includes('--dev');
rmSync(new URL('./dist', import.meta.url), { recursive: true, force: true });
await build({
  entryPoints: ['src/terminal.ts', 'src/run.ts', 'src/dashboard.ts', 'src/tasks.ts', 'src/content.ts'],
  outdir: 'dist',
  bundle: true,
  format: 'iife',
  target: ['es2020', 'chrome100', 'firefox100', 'safari15'],
  minify: !dev,
  sourcemap: dev ? 'inline' : false,
  legalComments: 'none',
  logLevel: 'info',
  loader: { '.css': 'css' },
});
