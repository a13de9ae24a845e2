// Showing numbers and certificates to people. A radius or a lower bound shown rounded is
// rounded DOWN (toward the safe side), from the shortest decimal form of the stored double
// (the number JSON carried), never to the nearest: 0.49996 shows as 0.499.

/** Exact decimal digits of a JavaScript number's shortest form, without an exponent. */
function plainDecimal(x) {
  const text = String(x);
  const m = /^(\d)(?:\.(\d+))?e([+-]\d+)$/.exec(text);
  if (!m) return text;
  const digits = m[1] + (m[2] || "");
  const exp = Number(m[3]);
  if (exp < 0) return "0." + "0".repeat(-exp - 1) + digits;
  return digits.padEnd(exp + 1, "0");
}

/** `x` rounded toward minus infinity to `digits` decimals, as text ("0.499"). */
export function roundDown(x, digits = 3) {
  if (typeof x !== "number" || !Number.isFinite(x)) return String(x);
  const [whole, frac = ""] = plainDecimal(Math.abs(x)).split(".");
  const kept = frac.slice(0, digits).padEnd(digits, "0");
  const cut = /[1-9]/.test(frac.slice(digits));
  let text = digits > 0 ? `${whole}.${kept}` : whole;
  if (x < 0) {
    // toward minus infinity: a negative number with digits cut off grows in magnitude
    if (cut) text = (Number(text) + 10 ** -digits).toFixed(digits);
    return /[1-9]/.test(text) ? `-${text}` : text;
  }
  return text;
}

export function count(n) {
  return typeof n === "number" ? n.toLocaleString("en-US") : "-";
}

export function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function seconds(s) {
  return typeof s === "number" ? `${s < 10 ? s.toFixed(2) : s.toFixed(0)} s` : "-";
}

/** Why a certificate abstained, in plain words. */
export function abstainReason(code) {
  const words = {
    pa_lower_below_half:
      "the top class was not clearly above 1/2 under noise: try more samples or a smaller sigma",
    pa_lower_not_above_pb_upper:
      "the top class was not clearly ahead of the runner-up under noise (its lower bound did " +
      "not exceed the runner-up's upper bound): try more samples or a smaller sigma",
    top_two_not_significant:
      "the two most frequent classes under noise were too close to tell apart at this alpha " +
      "(binomial test): try more samples or a smaller sigma",
  };
  return words[code] || `the service gave the reason "${code}"`;
}

/** A sequential decision in plain words. */
export function decisionWords(decision, target) {
  const r = typeof target === "number" ? ` at radius ${target}` : "";
  const words = {
    certified: `certified${r}`,
    not_certified: `not certified${r}`,
    undecided: `undecided${r}: the sample budget ran out before a decision`,
  };
  return words[decision] || String(decision);
}

/** True when a licence note says the weights are for non-commercial use only. */
export function nonCommercial(licence) {
  return /\bNC\b|non-?commercial/i.test(licence || "");
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
