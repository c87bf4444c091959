// The run page's checklist: follows the run's event stream (`event: task`, each a TaskView) and
// ticks tasks live, shows the current hint, answers input tasks through
// POST /api/v1/runs/{id}/tasks/{name}/input (accepted / refused with the hint), and shows
// "you broke it" with the Restart form when a task failed for good.

import { api, ApiError } from './api';

/** TaskView of the REST API. */
interface TaskView {
  name: string;
  machine: string;
  state: 'blocked' | 'running' | 'completed' | 'failed';
  hint: string;
  init: boolean;
  input: boolean;
  attempt: number;
  at?: string;
}

interface InputResult {
  accepted: boolean;
  hint: string;
}

function rows(root: HTMLElement): HTMLElement[] {
  return Array.from(root.querySelectorAll<HTMLElement>('li.task'));
}

function summarize(root: HTMLElement): void {
  const all = rows(root);
  const done = all.filter((r) => r.dataset.state === 'completed').length;
  const count = document.getElementById('tasks-count');
  if (count) count.textContent = `${done}/${all.length}`;
  const ready = all.filter((r) => r.dataset.init === 'true').every((r) => r.dataset.state === 'completed');
  root.dataset.ready = String(ready);
  const setup = document.getElementById('tasks-setup');
  if (setup) setup.hidden = ready;
  const broken = document.getElementById('tasks-broken');
  if (broken) broken.hidden = !all.some((r) => r.dataset.state === 'failed');
  // A content item's run: every task the student does completed = solved (it stays solved).
  const solved = document.getElementById('content-solved');
  const student = all.filter((r) => r.dataset.init !== 'true');
  if (solved && student.length > 0 && student.every((r) => r.dataset.state === 'completed')) solved.hidden = false;
}

/** The `::task{name=…}` placeholders of the content text show the same state as the row. */
function placeholders(name: string, state: string, label: string): void {
  for (const el of document.querySelectorAll<HTMLElement>(`.content-task[data-task="${CSS.escape(name)}"]`)) {
    el.dataset.state = state;
    const text = el.querySelector<HTMLElement>('.content-task-label') ?? el;
    text.textContent = `${label}: ${state}`;
    const form = el.querySelector<HTMLFormElement>('form.inline-answer');
    if (form) form.hidden = state === 'completed';
  }
}

function apply(root: HTMLElement, t: TaskView): void {
  const row = root.querySelector<HTMLElement>(`li.task[data-task="${CSS.escape(t.name)}"]`);
  if (!row) return;
  placeholders(t.name, t.state, row.querySelector('.task-name')?.textContent ?? t.name);
  row.dataset.state = t.state;
  const state = row.querySelector<HTMLElement>('.task-state');
  if (state) state.textContent = t.state;
  const hint = row.querySelector<HTMLElement>('.task-hint');
  if (hint) {
    hint.textContent = t.hint;
    hint.hidden = t.hint === '';
  }
  const form = row.querySelector<HTMLFormElement>('form.task-input');
  if (form) form.hidden = t.state === 'completed';
  if (t.state === 'completed') {
    const result = row.querySelector<HTMLElement>('.task-result');
    if (result && result.classList.contains('refused')) result.hidden = true;
  }
  summarize(root);
}

function follow(root: HTMLElement): void {
  const url = `/api/v1/runs/${encodeURIComponent(root.dataset.runId ?? '')}/events`;
  let source: EventSource | null = null;
  const open = () => {
    source = new EventSource(url);
    source.addEventListener('task', (e) => apply(root, JSON.parse((e as MessageEvent<string>).data) as TaskView));
    source.addEventListener('run', (e) => {
      const view = JSON.parse((e as MessageEvent<string>).data) as { state: string };
      if (view.state === 'destroyed') source?.close();
    });
    source.onerror = () => {
      if (source?.readyState === EventSource.CLOSED) window.setTimeout(open, 3000);
    };
  };
  open();
  window.addEventListener('pagehide', () => source?.close());
}

function answers(root: HTMLElement): void {
  for (const row of rows(root)) {
    const form = row.querySelector<HTMLFormElement>('form.task-input');
    const result = row.querySelector<HTMLElement>('.task-result');
    if (!form || !result) continue;
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const input = form.querySelector<HTMLInputElement>('input[name="value"]');
      const button = form.querySelector<HTMLButtonElement>('button');
      if (!input) return;
      if (button) button.disabled = true;
      result.hidden = false;
      result.className = 'task-result';
      result.textContent = 'Checking…';
      const path = `/api/v1/runs/${encodeURIComponent(root.dataset.runId ?? '')}/tasks/${encodeURIComponent(row.dataset.task ?? '')}/input`;
      api<InputResult>('POST', path, { value: input.value })
        .then((r) => {
          result.classList.add(r.accepted ? 'accepted' : 'refused');
          result.textContent = r.accepted ? 'Accepted.' : `Not accepted${r.hint ? `: ${r.hint}` : '.'}`;
          if (r.accepted) {
            row.dataset.state = 'completed';
            form.hidden = true;
            summarize(root);
          } else {
            input.select();
          }
        })
        .catch((err: Error) => {
          result.classList.add('refused');
          result.textContent = err instanceof ApiError && err.status === 409 ? `Not yet: ${err.message}` : err.message;
        })
        .finally(() => {
          if (button) button.disabled = false;
        });
    });
  }
}

const root = document.getElementById('tasks');
if (root) {
  for (const row of rows(root)) {
    placeholders(row.dataset.task ?? '', row.dataset.state ?? 'blocked', row.querySelector('.task-name')?.textContent ?? '');
  }
  follow(root);
  answers(root);
  summarize(root);
}
