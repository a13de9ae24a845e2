// What the page knows of each job mode: config.json's "mode_facts", read from the service's
// registry (models/modes). The page names no mode: it asks these facts instead.

let facts = {};

/** Keep config.json's per-mode facts (called once, with the config). */
export function setModes(modeFacts) {
  facts = modeFacts || {};
}

/** The facts of `mode`: uses_n0, default_n0, has_radius, has_curve, takes_target_radius,
 * takes_time_budget (a mode the page does not know: has a radius, uses n0). */
export function modeFacts(mode) {
  return facts[mode] || {
    uses_n0: true, default_n0: null, has_radius: true, has_curve: true,
    takes_target_radius: false, takes_time_budget: false,
  };
}

/** Whether a certificate of `mode` certifies a radius. */
export function hasRadius(mode) {
  return modeFacts(mode).has_radius;
}
