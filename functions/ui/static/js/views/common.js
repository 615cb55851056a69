// What views share: a function's state as people read it.

// "waking": asleep, but a request is waiting for it (the activator has woken it)
export function stateOf(fn) {
  if (fn.status === "ready" && fn.state === "asleep" && fn.in_flight > 0) return "waking";
  return fn.state;
}

export const enc = encodeURIComponent;
