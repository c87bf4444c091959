// The run page's live state: follows GET /api/v1/runs/{id}/events (Server-Sent Events) and
// updates the page without a reload; other islands hear about changes through the
// `ironlab:run` DOM event.

import { api, humanDuration, isActive, isKept, RunView } from './api';

function show(el: HTMLElement | null, visible: boolean): void {
  if (el) el.hidden = !visible;
}

function apply(root: HTMLElement, view: RunView): void {
  root.dataset.state = view.state;
  const title = document.getElementById('run-title');
  if (title && title.textContent !== view.title) {
    title.textContent = view.title;
    document.title = `${view.title} · ironlab`;
  }
  const badge = document.getElementById('run-state');
  if (badge) {
    badge.textContent = view.state;
    badge.className = `state state-${view.state}`;
  }
  const reason = document.getElementById('run-reason');
  if (reason) {
    reason.textContent = view.reason ?? '';
    show(reason, Boolean(view.reason));
  }
  show(
    document.getElementById('run-progress'),
    view.state === 'pending' || view.state === 'starting' || view.state === 'restarting',
  );
  show(document.getElementById('terminals'), view.state === 'running');
  show(document.getElementById('run-ended'), !isActive(view.state) && !isKept(view.state));
  show(document.getElementById('run-stopped'), isKept(view.state));
  show(document.getElementById('stop-form'), view.state === 'running');
  show(document.getElementById('destroy-form'), isActive(view.state) || isKept(view.state));
  if (!isActive(view.state)) {
    const left = document.getElementById('run-left');
    if (left) left.textContent = '';
  }
  document.dispatchEvent(new CustomEvent<RunView>('ironlab:run', { detail: view }));
}

function tickTimeLeft(root: HTMLElement): void {
  const left = document.getElementById('run-left');
  const expires = Number(root.dataset.expires);
  if (!left || !expires || !isActive((root.dataset.state ?? '') as RunView['state'])) return;
  left.textContent = `${humanDuration(expires - Date.now())} left`;
}

function follow(root: HTMLElement): void {
  const url = root.dataset.events;
  if (!url) return;
  let source: EventSource | null = null;
  const open = () => {
    source = new EventSource(url);
    source.addEventListener('run', (e) => {
      const view = JSON.parse((e as MessageEvent<string>).data) as RunView;
      apply(root, view);
      if (view.state === 'destroyed') source?.close();
    });
    source.onerror = () => {
      // EventSource retries by itself unless the server refused; then try again later.
      if (source?.readyState === EventSource.CLOSED && root.dataset.state !== 'destroyed') {
        window.setTimeout(open, 3000);
      }
    };
  };
  open();
  window.addEventListener('pagehide', () => source?.close());
}

function destroyInPlace(root: HTMLElement): void {
  const form = document.getElementById('destroy-form') as HTMLFormElement | null;
  form?.addEventListener('submit', (e) => {
    e.preventDefault();
    const button = form.querySelector('button');
    if (button) button.disabled = true;
    api<RunView>('DELETE', `/api/v1/runs/${encodeURIComponent(root.dataset.runId ?? '')}`)
      .then((view) => apply(root, view))
      .catch((err: Error) => {
        const reason = document.getElementById('run-reason');
        if (reason) {
          reason.textContent = `Could not destroy the run: ${err.message}`;
          reason.hidden = false;
        }
      })
      .finally(() => {
        if (button) button.disabled = false;
      });
  });
}

const root = document.getElementById('run');
if (root) {
  follow(root);
  destroyInPlace(root);
  window.setInterval(() => tickTimeLeft(root), 30_000);
}
