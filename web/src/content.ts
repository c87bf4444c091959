// Content text (content pages and the run page of an item): the Copy and "Run in terminal"
// buttons of code blocks. Run types the block into the active terminal of the run page (through
// window.ironlab.tabs from terminal.ts); where there is no terminal (the item page before Start)
// the Run buttons are hidden.

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

function setup(root: HTMLElement): void {
  const hasTerminal = document.getElementById('terminals') !== null;
  for (const run of root.querySelectorAll<HTMLButtonElement>('.code-block button[data-action="run"]')) {
    run.hidden = !hasTerminal;
  }
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
