// Dashboard actions without reloads: rename a run in place (PATCH), destroy it (DELETE) and
// watch it go, and keep the ages and times left current. Without scripts the same forms post
// to the server and redirect back.

import { api, humanDuration, isActive, RunView } from './api';

function setState(tr: HTMLTableRowElement, view: RunView): void {
  tr.dataset.state = view.state;
  const badge = tr.querySelector('.state');
  if (badge) {
    badge.textContent = view.state;
    badge.className = `state state-${view.state}`;
  }
  if (!isActive(view.state)) {
    tr.querySelector('.actions')?.replaceChildren();
    const left = tr.querySelector<HTMLElement>('.left');
    if (left) {
      left.textContent = '—';
      delete left.dataset.expires;
    }
  }
}

/** Long-polls the run until it settles (destroyed), updating the row. */
async function watch(tr: HTMLTableRowElement, id: string): Promise<void> {
  for (let i = 0; i < 20; i++) {
    const view = await api<RunView>('GET', `/api/v1/runs/${encodeURIComponent(id)}?wait=30`);
    setState(tr, view);
    if (view.state === 'destroyed' || view.state === 'failed') return;
  }
}

/** A stop or restart in progress: once it settles, reload so the row gets its new actions. */
async function settleThenReload(id: string): Promise<void> {
  for (let i = 0; i < 10; i++) {
    const view = await api<RunView>('GET', `/api/v1/runs/${encodeURIComponent(id)}?wait=30`);
    if (view.state !== 'stopping' && view.state !== 'restarting') {
      window.location.reload();
      return;
    }
  }
}

function enhanceRename(tr: HTMLTableRowElement, id: string): void {
  const form = tr.querySelector<HTMLFormElement>('form.rename');
  const input = form?.querySelector<HTMLInputElement>('input[name=title]');
  const button = form?.querySelector<HTMLButtonElement>('button');
  if (!form || !input) return;
  // Edit in place: the input looks like text; Enter or leaving the field saves.
  if (button) button.hidden = true;
  let saved = input.value;
  const save = async () => {
    const title = input.value.trim();
    if (!title || title === saved) {
      input.value = saved;
      return;
    }
    try {
      const view = await api<RunView>('PATCH', `/api/v1/runs/${encodeURIComponent(id)}`, { title });
      saved = view.title;
      input.value = view.title;
      tr.classList.add('saved');
      window.setTimeout(() => tr.classList.remove('saved'), 1200);
    } catch (e) {
      input.value = saved;
      alert(`Could not rename the run: ${(e as Error).message}`);
    }
  };
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    void save();
  });
  input.addEventListener('blur', () => void save());
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') {
      input.value = saved;
      input.blur();
    }
  });
}

function enhanceDestroy(tr: HTMLTableRowElement, id: string): void {
  const form = tr.querySelector<HTMLFormElement>('form.destroy');
  form?.addEventListener('submit', (e) => {
    e.preventDefault();
    const button = form.querySelector('button');
    if (button) button.disabled = true;
    api<RunView>('DELETE', `/api/v1/runs/${encodeURIComponent(id)}`)
      .then((view) => {
        setState(tr, view);
        return watch(tr, id);
      })
      .catch((err: Error) => {
        if (button) button.disabled = false;
        alert(`Could not destroy the run: ${err.message}`);
      });
  });
}

function tick(): void {
  const now = Date.now();
  for (const td of document.querySelectorAll<HTMLElement>('td.age[data-created]')) {
    td.textContent = humanDuration(now - Number(td.dataset.created));
  }
  for (const td of document.querySelectorAll<HTMLElement>('td.left[data-expires]')) {
    td.textContent = humanDuration(Number(td.dataset.expires) - now);
  }
}

for (const tr of document.querySelectorAll<HTMLTableRowElement>('tr[data-run-id]')) {
  const id = tr.dataset.runId ?? '';
  enhanceRename(tr, id);
  enhanceDestroy(tr, id);
  if (tr.dataset.state === 'destroying') void watch(tr, id);
  if (tr.dataset.state === 'stopping' || tr.dataset.state === 'restarting') void settleThenReload(id);
}
window.setInterval(tick, 30_000);
