// Shared helpers of the islands: the session's CSRF token and JSON calls to /api/v1.

/** The CSRF token the page was rendered with (`<meta name="csrf-token">`). */
export function csrfToken(): string {
  const meta = document.querySelector<HTMLMetaElement>('meta[name="csrf-token"]');
  return meta?.content ?? '';
}

/** An error answer of the API: `{error, detail}`. */
export class ApiError extends Error {
  constructor(
    public status: number,
    public kind: string,
    detail: string,
  ) {
    super(detail);
  }
}

/** Calls the REST API with the session cookie; state-changing calls carry the CSRF header. */
export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = csrfToken();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  let json: unknown = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!resp.ok) {
    const e = (json ?? {}) as { error?: string; detail?: string };
    throw new ApiError(resp.status, e.error ?? 'http_error', e.detail ?? `HTTP ${resp.status}`);
  }
  return json as T;
}

/** RunView of the REST API. */
export interface RunView {
  id: string;
  playground: string;
  title: string;
  state:
    | 'pending'
    | 'starting'
    | 'running'
    | 'destroying'
    | 'destroyed'
    | 'failed'
    | 'stopping'
    | 'stopped'
    | 'restarting';
  reason?: string;
  machines: string[];
  owner: string;
  created_at: string;
  updated_at: string;
}

/** "3 min", "2 h 5 min", "4 d 2 h": the same wording as the server-rendered pages. */
export function humanDuration(ms: number): string {
  const mins = Math.floor(Math.max(0, ms) / 60000);
  if (mins === 0) return 'less than a minute';
  if (mins < 60) return `${mins} min`;
  if (mins < 24 * 60) {
    const r = mins % 60;
    return r === 0 ? `${Math.floor(mins / 60)} h` : `${Math.floor(mins / 60)} h ${r} min`;
  }
  const h = Math.floor(mins / 60) % 24;
  const d = Math.floor(mins / (24 * 60));
  return h === 0 ? `${d} d` : `${d} d ${h} h`;
}

/** Whether a run still has machines (or will have). */
export function isActive(state: RunView['state']): boolean {
  return state === 'pending' || state === 'starting' || state === 'running';
}

/** Whether a run is (being) stopped or restarted: its drives are kept. */
export function isKept(state: RunView['state']): boolean {
  return state === 'stopping' || state === 'stopped' || state === 'restarting';
}
