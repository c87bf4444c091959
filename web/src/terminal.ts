// The terminal island of the run page: one xterm.js terminal per tab, each a shell on a machine
// of the run, reached over a WebSocket to the worker's terminal relay.
//
// Protocol (crates/ironlab-api/src/relay.rs): POST /api/v1/runs/{id}/connect (session cookie +
// X-CSRF-Token) gives a single-use, 30-second URL; the first frame is the JSON
// `{"type":"start","tty":true,"cols":…,"rows":…,"term":"xterm-256color"}` (plus
// `"session":ID` to re-attach to a shell after a dropped connection); the relay answers
// `{"type":"started","session":ID}`, then binary frames carry bytes (first byte: 0 stdin,
// 1 stdout, 2 stderr) and text frames carry `resize`, `exit` and `error`.
//
// Memory is bounded in the browser: the scrollback is capped, and when output arrives faster
// than xterm.js can draw it, only the newest 256 KiB wait (the rest is dropped, with a note on
// screen), so a flood cannot queue without bound and the final prompt is always shown.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { WebLinksAddon } from '@xterm/addon-web-links';
import { Unicode11Addon } from '@xterm/addon-unicode11';
import '@xterm/xterm/css/xterm.css';
import { api, ApiError, RunView } from './api';

const STDIN = 0;
const STDOUT = 1;
const STDERR = 2;
/** Lines of history kept per terminal. */
const SCROLLBACK = 5000;
/** Output queued in xterm.js (bytes) above which new output waits in a small backlog… */
const HIGH_WATER = 2 * 1024 * 1024;
/** …that is handed over once the queue is below this again… */
const LOW_WATER = 256 * 1024;
/** …and keeps only the newest output: older bytes are dropped (with a note on screen). */
const BACKLOG_MAX = 256 * 1024;
/** Longest wait between reconnection attempts. */
const MAX_RETRY_MS = 5000;
/** Attempts before giving up and offering a button. */
const MAX_ATTEMPTS = 12;
/** Close code of a connection whose session another connection took over (relay.rs). */
const CLOSE_REPLACED = 4001;

interface ConnectResponse {
  url: string;
  token: string;
  machine: string;
  expires_at: string;
}

type ServerControl =
  | { type: 'started'; session?: string }
  | { type: 'exit'; code: number }
  | { type: 'error'; message: string };

type Phase = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'ended' | 'disposed';

const encoder = new TextEncoder();

function frame(stream: number, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(data.length + 1);
  out[0] = stream;
  out.set(data, 1);
  return out;
}

/** One shell: an xterm.js terminal bound to a relay session that survives reconnects. */
export class TerminalSession {
  readonly term: Terminal;
  readonly fit = new FitAddon();
  /** The open WebSocket (tests close it to simulate a dropped connection). */
  socket: WebSocket | null = null;
  /** The relay's session id, used to re-attach after a dropped connection. */
  session: string | null = null;
  phase: Phase = 'idle';
  /** How many times the session was (re)started; tests wait for it to grow. */
  starts = 0;
  /** Bytes dropped because output came faster than it could be drawn. */
  dropped = 0;
  private attempts = 0;
  private pending = 0;
  private backlog: Uint8Array[] = [];
  private backlogBytes = 0;
  private droppedShown = 0;
  private retryTimer: number | undefined;
  private readonly overlay: HTMLElement;
  private readonly overlayText: HTMLElement;
  private readonly overlayButton: HTMLButtonElement;
  private overlayAction: () => void = () => this.newShell();
  private readonly observer: ResizeObserver;
  private readonly container: HTMLElement;

  constructor(
    readonly panel: HTMLElement,
    readonly runId: string,
    readonly machine: string,
  ) {
    this.container = document.createElement('div');
    this.container.className = 'term';
    panel.replaceChildren(this.container);
    this.overlay = document.createElement('div');
    this.overlay.className = 'overlay';
    this.overlay.setAttribute('role', 'status');
    this.overlayText = document.createElement('p');
    this.overlayButton = document.createElement('button');
    this.overlayButton.type = 'button';
    this.overlayButton.textContent = 'New shell';
    this.overlayButton.addEventListener('click', () => this.overlayAction());
    this.overlay.append(this.overlayText, this.overlayButton);
    panel.append(this.overlay);

    this.term = new Terminal({
      allowProposedApi: true,
      cursorBlink: true,
      scrollback: SCROLLBACK,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace',
      fontSize: 14,
      theme: { background: '#101418', foreground: '#e6edf3' },
      macOptionIsMeta: true,
    });
    this.term.loadAddon(this.fit);
    this.term.loadAddon(new WebLinksAddon());
    const unicode = new Unicode11Addon();
    this.term.loadAddon(unicode);
    this.term.unicode.activeVersion = '11';
    this.term.open(this.container);
    this.term.attachCustomKeyEventHandler((e) => this.onKey(e));
    this.container.addEventListener('contextmenu', (e) => this.onContextMenu(e));
    this.term.onData((data) => this.send(encoder.encode(data)));
    this.term.onBinary((data) => this.send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
    this.term.onResize(({ cols, rows }) => this.control({ type: 'resize', cols, rows }));
    this.observer = new ResizeObserver(() => this.refit());
    this.observer.observe(this.container);
    this.refit();
  }

  /** Connects (first time) or re-attaches (after a drop) to the shell. */
  async connect(): Promise<void> {
    if (this.phase === 'disposed' || this.phase === 'ended') return;
    window.clearTimeout(this.retryTimer);
    const reattach = this.session !== null;
    this.phase = reattach ? 'reconnecting' : 'connecting';
    this.showOverlay(reattach ? 'Connection lost — reconnecting…' : 'Connecting…');
    let grant: ConnectResponse;
    try {
      grant = await api<ConnectResponse>('POST', `/api/v1/runs/${encodeURIComponent(this.runId)}/connect`, {
        machine: this.machine,
      });
    } catch (e) {
      if (e instanceof ApiError && (e.status === 409 || e.status === 404 || e.status === 403)) {
        this.end(e.message);
        return;
      }
      if (e instanceof ApiError && e.status === 401) {
        this.end('You are signed out. Reload the page to sign in again.');
        return;
      }
      this.retry();
      return;
    }
    if ((this.phase as Phase) === 'disposed') return;
    const ws = new WebSocket(grant.url);
    ws.binaryType = 'arraybuffer';
    this.socket = ws;
    ws.onopen = () => {
      this.refit();
      const start: Record<string, unknown> = {
        type: 'start',
        tty: true,
        cols: this.term.cols,
        rows: this.term.rows,
        term: 'xterm-256color',
      };
      if (this.session) start.session = this.session;
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (ev: MessageEvent) => {
      if (typeof ev.data === 'string') {
        let msg: ServerControl;
        try {
          msg = JSON.parse(ev.data) as ServerControl;
        } catch {
          return;
        }
        this.onControl(msg);
      } else {
        const bytes = new Uint8Array(ev.data as ArrayBuffer);
        if (bytes.length > 1 && (bytes[0] === STDOUT || bytes[0] === STDERR)) {
          this.write(bytes.subarray(1));
        }
      }
    };
    ws.onclose = (ev: CloseEvent) => {
      if (this.socket !== ws) return;
      this.socket = null;
      if (this.phase === 'ended' || this.phase === 'disposed') return;
      if (ev.code === CLOSE_REPLACED) {
        // Another window attached to this shell: do not fight over it.
        this.phase = 'ended';
        this.showOverlay('This shell was opened in another window.', 'Use it here', () => {
          this.phase = 'idle';
          this.attempts = 0;
          void this.connect();
        });
        return;
      }
      this.retry();
    };
  }

  private onControl(msg: ServerControl): void {
    switch (msg.type) {
      case 'started':
        // Re-attached: the relay replays recent output, so start from a clean screen.
        if (this.session !== null && msg.session === this.session) this.term.reset();
        this.session = msg.session || null;
        this.phase = 'open';
        this.attempts = 0;
        this.starts += 1;
        this.hideOverlay();
        // Sizes may have changed while we were away.
        this.control({ type: 'resize', cols: this.term.cols, rows: this.term.rows });
        if (!this.panel.hidden) this.term.focus();
        break;
      case 'exit':
        this.session = null;
        this.end(`The shell exited${msg.code ? ` with status ${msg.code}` : ''}. Session ended.`);
        break;
      case 'error':
        if (this.phase === 'reconnecting' && this.session) {
          // The shell we wanted is gone (e.g. the worker restarted).
          this.session = null;
          this.end(`Your previous shell is gone: ${msg.message}`);
        } else {
          this.end(msg.message);
        }
        break;
    }
  }

  private retry(): void {
    if (this.phase === 'ended' || this.phase === 'disposed') return;
    this.attempts += 1;
    if (this.attempts > MAX_ATTEMPTS) {
      this.end('Could not reconnect to the terminal.');
      return;
    }
    this.phase = 'reconnecting';
    this.showOverlay('Connection lost — reconnecting…');
    const delay = Math.min(250 * 2 ** (this.attempts - 1), MAX_RETRY_MS);
    this.retryTimer = window.setTimeout(() => void this.connect(), delay);
  }

  private end(message: string): void {
    this.phase = 'ended';
    const ws = this.socket;
    this.socket = null;
    ws?.close();
    this.showOverlay(message, 'New shell', () => this.newShell());
  }

  /** Starts a fresh shell in this tab (after the previous one ended). */
  newShell(): void {
    if (this.phase === 'disposed') return;
    this.session = null;
    this.attempts = 0;
    this.phase = 'idle';
    this.term.reset();
    void this.connect();
  }

  /** Closes the connection for good and frees the terminal. */
  dispose(): void {
    this.phase = 'disposed';
    window.clearTimeout(this.retryTimer);
    const ws = this.socket;
    this.socket = null;
    ws?.close();
    this.observer.disconnect();
    this.term.dispose();
  }

  /** Fits the terminal to its box (when visible). */
  refit(): void {
    if (this.phase === 'disposed' || this.container.clientWidth === 0 || this.panel.hidden) return;
    try {
      this.fit.fit();
    } catch {
      // Not laid out yet.
    }
  }

  focus(): void {
    this.refit();
    this.term.focus();
  }

  /** The visible screen and scrollback as text lines (for tests and accessibility tools). */
  lines(): string[] {
    const buf = this.term.buffer.active;
    const out: string[] = [];
    for (let i = 0; i < buf.length; i++) out.push(buf.getLine(i)?.translateToString(true) ?? '');
    return out;
  }

  /** Types `text` into the terminal as if the user had (the content pages' "Run in terminal"). */
  typeText(text: string): void {
    this.send(new TextEncoder().encode(text));
    this.term.focus();
  }

  private send(data: Uint8Array): void {
    if (this.phase !== 'open' || this.socket?.readyState !== WebSocket.OPEN) return;
    this.socket.send(frame(STDIN, data));
  }

  private control(msg: object): void {
    if (this.phase !== 'open' || this.socket?.readyState !== WebSocket.OPEN) return;
    this.socket.send(JSON.stringify(msg));
  }

  private write(data: Uint8Array): void {
    if (this.pending > HIGH_WATER || this.backlog.length > 0) {
      // xterm.js is behind: keep only the newest output (it ends with the prompt).
      this.backlog.push(data.slice());
      this.backlogBytes += data.length;
      while (this.backlogBytes > BACKLOG_MAX && this.backlog.length > 1) {
        const old = this.backlog.shift() as Uint8Array;
        this.backlogBytes -= old.length;
        this.dropped += old.length;
      }
      return;
    }
    this.feed(data.slice());
  }

  /** Hands bytes to xterm.js (it keeps the buffer: callers pass a copy). */
  private feed(data: Uint8Array): void {
    this.pending += data.length;
    this.term.write(data, () => {
      this.pending -= data.length;
      this.drain();
    });
  }

  /** Once xterm.js has caught up, shows what was kept while it was behind. */
  private drain(): void {
    if (this.backlog.length === 0 || this.pending > LOW_WATER || this.phase === 'disposed') return;
    const chunks = this.backlog;
    this.backlog = [];
    this.backlogBytes = 0;
    if (this.dropped > this.droppedShown) {
      this.droppedShown = this.dropped;
      this.term.write('\r\n\x1b[33m[ironlab: output came faster than it could be shown; skipped some]\x1b[0m\r\n');
    }
    for (const c of chunks) this.feed(c);
  }

  private onKey(e: KeyboardEvent): boolean {
    if (e.type !== 'keydown' || !e.ctrlKey || !e.shiftKey) return true;
    if (e.code === 'KeyC') {
      const text = this.term.getSelection();
      if (text) void navigator.clipboard?.writeText(text).catch(() => undefined);
      return false;
    }
    // Ctrl+Shift+V: let the browser paste; xterm.js receives the paste event.
    if (e.code === 'KeyV') return false;
    return true;
  }

  private onContextMenu(e: MouseEvent): void {
    if (this.term.hasSelection()) {
      e.preventDefault();
      const text = this.term.getSelection();
      void navigator.clipboard?.writeText(text).catch(() => undefined);
      this.term.clearSelection();
      return;
    }
    if (navigator.clipboard?.readText) {
      e.preventDefault();
      navigator.clipboard
        .readText()
        .then((text) => {
          if (text) this.term.paste(text);
        })
        .catch(() => undefined);
      this.term.focus();
    }
  }

  private showOverlay(text: string, button?: string, action?: () => void): void {
    this.overlayText.textContent = text;
    this.overlayButton.hidden = !button;
    if (button && action) {
      this.overlayButton.textContent = button;
      this.overlayAction = action;
    }
    this.overlay.hidden = false;
  }

  private hideOverlay(): void {
    this.overlay.hidden = true;
  }
}

/** The tab strip: one tab per manifest terminal tab, plus the "+" for another shell. */
class Tabs {
  readonly sessions = new Map<HTMLElement, TerminalSession>();
  private running: boolean;
  private extra = 0;

  constructor(
    private readonly root: HTMLElement,
    private readonly runId: string,
    state: string,
  ) {
    this.running = state === 'running';
    const list = root.querySelector<HTMLElement>('[role=tablist]');
    const add = root.querySelector<HTMLButtonElement>('#add-tab');
    for (const tab of this.tabs()) tab.addEventListener('click', () => this.activate(tab));
    add?.addEventListener('click', () => this.addTab());
    list?.addEventListener('keydown', (e) => this.onTabKey(e));
    if (this.running) this.activate(this.activeTab());
  }

  tabs(): HTMLButtonElement[] {
    return Array.from(this.root.querySelectorAll<HTMLButtonElement>('[role=tab]'));
  }

  panels(): HTMLElement[] {
    return Array.from(this.root.querySelectorAll<HTMLElement>('[role=tabpanel]'));
  }

  activeTab(): HTMLButtonElement | undefined {
    return this.tabs().find((t) => t.getAttribute('aria-selected') === 'true') ?? this.tabs()[0];
  }

  activeSession(): TerminalSession | undefined {
    const i = this.tabs().indexOf(this.activeTab() as HTMLButtonElement);
    const panel = this.panels()[i];
    return panel ? this.sessions.get(panel) : undefined;
  }

  activate(tab: HTMLButtonElement | undefined): void {
    if (!tab) return;
    const tabs = this.tabs();
    const panels = this.panels();
    const index = tabs.indexOf(tab);
    tabs.forEach((t, i) => {
      t.setAttribute('aria-selected', String(i === index));
      t.tabIndex = i === index ? 0 : -1;
    });
    panels.forEach((p, i) => (p.hidden = i !== index));
    const panel = panels[index];
    if (!panel || !this.running) return;
    let session = this.sessions.get(panel);
    if (!session) {
      session = new TerminalSession(panel, this.runId, panel.dataset.machine ?? '');
      this.sessions.set(panel, session);
      terminals.push(session);
      void session.connect();
    }
    // Let the panel lay out before fitting.
    requestAnimationFrame(() => session?.focus());
  }

  /** Opens another shell on the machine of the active tab. */
  addTab(): void {
    const current = this.activeTab();
    const machine = current?.dataset.machine ?? this.tabs()[0]?.dataset.machine;
    if (!machine) return;
    this.extra += 1;
    const tab = document.createElement('button');
    tab.type = 'button';
    tab.setAttribute('role', 'tab');
    tab.className = 'tab';
    tab.dataset.machine = machine;
    tab.dataset.extra = 'true';
    tab.textContent = `${machine} (${this.extra + 1})`;
    const close = document.createElement('span');
    close.className = 'close';
    close.textContent = '×';
    close.title = 'Close this shell';
    close.setAttribute('aria-label', 'Close this shell');
    close.addEventListener('click', (e) => {
      e.stopPropagation();
      this.closeTab(tab);
    });
    tab.append(close);
    tab.addEventListener('click', () => this.activate(tab));
    const panel = document.createElement('div');
    panel.className = 'panel';
    panel.setAttribute('role', 'tabpanel');
    panel.dataset.machine = machine;
    panel.hidden = true;
    this.root.querySelector('#add-tab')?.before(tab);
    this.root.querySelector('.panels')?.append(panel);
    this.activate(tab);
  }

  closeTab(tab: HTMLButtonElement): void {
    const i = this.tabs().indexOf(tab);
    const panel = this.panels()[i];
    if (panel) {
      this.sessions.get(panel)?.dispose();
      this.sessions.delete(panel);
      panel.remove();
    }
    const wasActive = tab.getAttribute('aria-selected') === 'true';
    tab.remove();
    if (wasActive) this.activate(this.tabs()[Math.max(0, i - 1)]);
  }

  onRunState(view: RunView): void {
    const running = view.state === 'running';
    if (running === this.running) return;
    this.running = running;
    if (running) {
      // The container was hidden until now: activate once it is laid out.
      requestAnimationFrame(() => this.activate(this.activeTab()));
    } else {
      for (const s of this.sessions.values()) s.dispose();
      this.sessions.clear();
    }
  }

  private onTabKey(e: KeyboardEvent): void {
    if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
    const tabs = this.tabs();
    const i = tabs.indexOf(this.activeTab() as HTMLButtonElement);
    const next = tabs[(i + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length];
    next?.focus();
    this.activate(next);
  }
}

/** Every terminal of the page, in creation order (read by the browser tests). */
const terminals: TerminalSession[] = [];

declare global {
  interface Window {
    ironlab?: { terminals: TerminalSession[]; tabs?: Tabs };
  }
}

function main(): void {
  const run = document.getElementById('run');
  const root = document.getElementById('terminals');
  if (!run || !root) return;
  const tabs = new Tabs(root, run.dataset.runId ?? '', run.dataset.state ?? '');
  window.ironlab = { ...(window.ironlab ?? {}), terminals, tabs };
  document.addEventListener('ironlab:run', (e) => tabs.onRunState((e as CustomEvent<RunView>).detail));
}

main();
