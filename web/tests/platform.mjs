// Test fixture: a real platform (`ironlab up` = control plane + worker) on a temp data dir and
// free ports, driven like a user would, and cleaned up completely afterwards (runs destroyed
// through the API, the process stopped, leftover mounts/loop devices/containers/netns removed).

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The `ironlab` binary under test: IRONLAB_BIN, else the cargo debug build, else release. */
export function ironlabBin() {
  if (process.env.IRONLAB_BIN) return process.env.IRONLAB_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? path.join(repoRoot, 'target');
  const candidates = ['debug', 'release'].map((p) => path.join(target, p, 'ironlab'));
  const found = candidates.filter((c) => fs.existsSync(c));
  // The newest build is the one that matches the sources best.
  found.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
  return found[0] ?? candidates[0];
}

export const CHROMIUM = process.env.IRONLAB_CHROMIUM ?? '/usr/bin/chromium';

/** Why the browser tests cannot run here, or null. */
export function unmetPreconditions() {
  if (process.getuid?.() !== 0) return 'needs root (the worker creates namespaces, mounts and containers)';
  const bin = ironlabBin();
  if (!fs.existsSync(bin)) return `ironlab binary ${bin} missing (cargo build -p ironlab, or set IRONLAB_BIN)`;
  if (!fs.existsSync(CHROMIUM)) return `${CHROMIUM} missing (apt-get install chromium; scripts/setup.sh does)`;
  const stock = process.env.IRONLAB_STOCK_IMAGES ?? '/var/lib/ironlab/stock-images';
  if (!fs.existsSync(path.join(stock, 'debian', 'index.json'))) {
    return `stock image ${stock}/debian missing (set IRONLAB_STOCK_IMAGES; images/debian/build.sh builds it)`;
  }
  const agent = process.env.IRONLAB_AGENT ?? path.join(path.dirname(bin), 'ironlab-agent-static');
  if (!fs.existsSync(agent)) return `agent ${agent} missing (set IRONLAB_AGENT; scripts/build-agent.sh builds it)`;
  return null;
}

function portFree(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/** A port P such that P and P+1 are free (`ironlab up` puts the worker on P+1). */
async function freePortPair() {
  for (let i = 0; i < 200; i++) {
    const p = 20000 + Math.floor(Math.random() * 40000);
    if ((await portFree(p)) && (await portFree(p + 1))) return p;
  }
  throw new Error('no free pair of ports on 127.0.0.1');
}

function quiet(cmd, args) {
  try {
    return execFileSync(cmd, args, { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
  } catch {
    return '';
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class Platform {
  constructor(dir, port, child, logFile) {
    this.dir = dir;
    this.data = path.join(dir, 'data');
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.child = child;
    this.logFile = logFile;
    this.link = null;
    this.token = null;
    this.exited = null;
    this.runs = new Set();
  }

  /** Starts `ironlab up` and waits for the admin sign-in link it prints. */
  static async start() {
    const dir = fs.mkdtempSync('/var/tmp/ironlab-web-');
    const port = await freePortPair();
    const logFile = path.join(dir, 'up.log');
    const log = fs.openSync(logFile, 'a');
    const child = spawn(
      ironlabBin(),
      ['up', '--listen', `127.0.0.1:${port}`, '--data-dir', path.join(dir, 'data')],
      {
        // IRONLAB_UPLINK=none: a test never lets a run reach the real network.
        env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info', NO_COLOR: '1', IRONLAB_UPLINK: 'none' },
        stdio: ['ignore', 'pipe', log],
      },
    );
    const p = new Platform(dir, port, child, logFile);
    child.on('exit', (code, signal) => {
      p.exited = { code, signal };
    });
    let out = '';
    const link = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`ironlab up printed no sign-in link within 180 s:\n${p.logTail()}`)), 180_000);
      child.stdout.on('data', (chunk) => {
        out += chunk.toString();
        fs.appendFileSync(logFile, chunk);
        const m = out.match(/admin sign-in link[^:]*: (http\S+)/);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      child.on('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`ironlab up exited (${code ?? signal}) before it was ready:\n${p.logTail()}`));
      });
    });
    p.link = link;
    p.token = fs.readFileSync(path.join(p.data, 'admin-token'), 'utf8').trim();
    return p;
  }

  logTail(n = 60) {
    try {
      return fs.readFileSync(this.logFile, 'utf8').split('\n').slice(-n).join('\n');
    } catch {
      return '(no log)';
    }
  }

  /** Calls the REST API with the admin's bearer token. */
  async api(method, p, body) {
    const resp = await fetch(`${this.base}/api/v1${p}`, {
      method,
      headers: {
        Authorization: `Bearer ${this.token}`,
        ...(body ? { 'Content-Type': 'application/json' } : {}),
      },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await resp.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = text;
    }
    return { status: resp.status, json };
  }

  track(id) {
    this.runs.add(id);
  }

  /** Destroys every run, stops `ironlab up`, removes whatever could be left, deletes the dir. */
  async stop() {
    if (this.exited === null) {
      try {
        const { json } = await this.api('GET', '/runs?all=true');
        for (const r of Array.isArray(json) ? json : []) this.runs.add(r.id);
        for (const id of this.runs) await this.api('DELETE', `/runs/${id}`);
        const deadline = Date.now() + 60_000;
        for (const id of this.runs) {
          while (Date.now() < deadline) {
            const { status, json: run } = await this.api('GET', `/runs/${id}?wait=5`);
            if (status === 404 || run?.state === 'destroyed') break;
            await sleep(200);
          }
        }
      } catch (e) {
        console.error(`cleanup: could not destroy runs through the API: ${e}`);
      }
      this.child.kill('SIGTERM');
      const deadline = Date.now() + 20_000;
      while (this.exited === null && Date.now() < deadline) await sleep(100);
      if (this.exited === null) this.child.kill('SIGKILL');
    }
    // What a crashed worker could leave: containers, network namespaces, mounts, loop devices.
    for (const id of this.runs) {
      for (const rt of ['crun', 'runc']) {
        for (const c of quiet(rt, ['list', '-q']).split('\n').filter((c) => c.includes(id))) {
          quiet(rt, ['kill', c, 'KILL']);
          quiet(rt, ['delete', '-f', c]);
        }
      }
      quiet('ip', ['netns', 'delete', `il-${id}`]);
      const machineNs = fs.existsSync('/run/netns') ? fs.readdirSync('/run/netns') : [];
      for (const ns of machineNs.filter((n) => n.startsWith(`ilm-${id}-`))) {
        quiet('ip', ['netns', 'delete', ns]);
      }
    }
    // Resolvers (dnsmasq) of this platform's runs: their configuration lives under our dir.
    for (const pid of fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
      let cmd = '';
      try {
        cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        continue;
      }
      if (cmd.includes('dnsmasq') && cmd.includes(this.dir)) quiet('kill', [pid]);
    }
    const mounts = fs
      .readFileSync('/proc/self/mounts', 'utf8')
      .split('\n')
      .map((l) => l.split(' ')[1])
      .filter((m) => m && m.startsWith(this.dir))
      .sort((a, b) => b.length - a.length);
    for (const m of mounts) quiet('umount', ['-l', m]);
    for (const line of quiet('losetup', ['-l', '-n', '-O', 'NAME,BACK-FILE']).split('\n')) {
      const [dev, back] = line.trim().split(/\s+/);
      if (dev && back && back.startsWith(this.dir)) quiet('losetup', ['-d', dev]);
    }
    try {
      fs.rmSync(this.dir, { recursive: true, force: true });
    } catch (e) {
      console.error(`cleanup: could not remove ${this.dir}: ${e}`);
    }
  }
}
