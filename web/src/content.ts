// Content text (content pages and the run page of an item): the Copy and "Run in terminal"
// buttons of code blocks, and hot reload. Run types the block into the active terminal of the run
// page (through window.ironlab.tabs from terminal.ts); where there is no terminal (the item page
// before Start) the Run buttons are hidden. Hot reload: /content/{name}/events sends
// `content` {version, html} for every version published while the page is open; the text is
// replaced in place (the terminals and the checklist are not touched).

interface Typing {
  typeText(text: string): void;
}

/** What terminal.ts exposes on window (typed there; only the part used here). */
function activeSession(): Typing | undefined {
  const w = window as unknown as { ironlab?: { tabs?: { activeSession(): Typing | undefined } } };
  return w.ironlab?.tabs?.activeSession();
}

function codeOf(button: HTMLElement): string {
  return button.closest('.code-block')?.querySelector('pre code')?.textContent ?? '';
}

function decorate(root: HTMLElement): void {
  const hasTerminal = document.getElementById('terminals') !== null;
  for (const run of root.querySelectorAll<HTMLButtonElement>('.code-block button[data-action="run"]')) {
    run.hidden = !hasTerminal;
  }
  // ::task placeholders show the state of their checklist row (tasks.ts keeps them live); an
  // input task gets an answer box that answers through the row's form (same request, same
  // result text).
  for (const el of root.querySelectorAll<HTMLElement>('.content-task[data-task]')) {
    const row = document.querySelector<HTMLElement>(`li.task[data-task="${CSS.escape(el.dataset.task ?? '')}"]`);
    if (!row) continue;
    el.dataset.state = row.dataset.state ?? 'blocked';
    const label = document.createElement('span');
    label.className = 'content-task-label';
    label.textContent = `${row.querySelector('.task-name')?.textContent ?? el.dataset.task}: ${el.dataset.state}`;
    el.replaceChildren(label);
    const rowForm = row.querySelector<HTMLFormElement>('form.task-input');
    if (row.dataset.input === 'true' && rowForm) inlineAnswer(el, row, rowForm);
  }
}

function inlineAnswer(el: HTMLElement, row: HTMLElement, rowForm: HTMLFormElement): void {
  const form = document.createElement('form');
  form.className = 'inline-answer';
  form.hidden = el.dataset.state === 'completed';
  const input = document.createElement('input');
  input.name = 'value';
  input.autocomplete = 'off';
  input.placeholder = 'Your answer';
  input.setAttribute('aria-label', `Answer for ${row.querySelector('.task-name')?.textContent ?? ''}`);
  const button = document.createElement('button');
  button.type = 'submit';
  button.textContent = 'Check';
  const result = document.createElement('span');
  result.className = 'inline-result';
  result.setAttribute('role', 'status');
  form.append(input, button, result);
  el.append(form);
  const rowResult = row.querySelector<HTMLElement>('.task-result');
  if (rowResult) {
    new MutationObserver(() => {
      result.textContent = rowResult.hidden ? '' : (rowResult.textContent ?? '');
      result.className = `inline-result ${rowResult.className.replace('task-result', '').trim()}`;
    }).observe(rowResult, { childList: true, characterData: true, subtree: true, attributes: true });
  }
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const target = rowForm.querySelector<HTMLInputElement>('input[name="value"]');
    if (!target) return;
    target.value = input.value;
    rowForm.requestSubmit();
  });
}

function hotReload(root: HTMLElement): void {
  const holder = root.closest<HTMLElement>('[data-content]') ?? root;
  const name = holder.dataset.content;
  if (!name) return;
  const lesson = holder.dataset.lesson;
  const query = lesson ? `?lesson=${encodeURIComponent(lesson)}` : '';
  const source = new EventSource(`/content/${encodeURIComponent(name)}/events${query}`);
  source.addEventListener('content', (e) => {
    const msg = JSON.parse((e as MessageEvent<string>).data) as { version: number; html?: string };
    if (msg.html === undefined || String(msg.version) === holder.dataset.version) return;
    root.innerHTML = msg.html;
    holder.dataset.version = String(msg.version);
    decorate(root);
    root.dispatchEvent(new CustomEvent('ironlab:content', { bubbles: true, detail: { version: msg.version } }));
  });
  window.addEventListener('pagehide', () => source.close());
}

function setup(root: HTMLElement): void {
  decorate(root);
  hotReload(root);
  root.addEventListener('click', (e) => {
    const button = (e.target as HTMLElement).closest<HTMLButtonElement>('.code-block button[data-action]');
    if (!button) return;
    const code = codeOf(button);
    if (button.dataset.action === 'copy') {
      void navigator.clipboard?.writeText(code).then(
        () => flash(button, 'Copied'),
        () => flash(button, 'Copy failed'),
      );
    } else if (button.dataset.action === 'run') {
      const session = activeSession();
      if (!session) {
        flash(button, 'No terminal yet');
        return;
      }
      session.typeText(code.endsWith('\n') ? code : `${code}\n`);
      flash(button, 'Sent');
    }
  });
}

function flash(button: HTMLButtonElement, text: string): void {
  const before = button.dataset.label ?? button.textContent ?? '';
  button.dataset.label = before;
  button.textContent = text;
  window.setTimeout(() => {
    button.textContent = before;
  }, 1200);
}

const text = document.getElementById('content-text');
if (text) setup(text);

export {};
