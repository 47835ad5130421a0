// Offline validation of rendered Kubernetes manifests and Grafana dashboards
// with published schemas (npm packages installed by scripts/install-deps.sh
// into tests/deploy/node_modules, versions pinned by package-lock.json):
//
//  1. Every manifest goes through the JSON-schema validator that
//     kubernetes-models generates from the Kubernetes OpenAPI spec
//     (required fields, types, enums, formats); ServiceMonitor and
//     PrometheusRule through @kubernetes-models/prometheus-operator, generated
//     from the operator's CRD schemas; Issuer and Certificate through
//     @kubernetes-models/cert-manager (cert-manager's CRD schemas).
//  2. Those validators allow unknown fields (as the API server does without
//     strict field validation), so every manifest is also type-checked by the
//     TypeScript compiler against the same packages' interfaces (IDeployment,
//     IServiceMonitor, ...): excess-property checks reject misspelled or
//     misplaced fields, as `kubectl apply --validate=strict` would.
//  3. Every dashboard is type-checked against @grafana/schema's Dashboard
//     (and each timeseries panel's options / custom field config against the
//     timeseries panel schema, each target against the Prometheus query).
//
//   node validate.mjs --manifests manifests.json --dashboards a.json,b.json --work DIR
//
// manifests.json: [{"source": "<file>#<doc>", "object": {...}}, ...].
// Prints one line per problem and exits 1 if there is any.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const ts = require("typescript");
const here = path.dirname(new URL(import.meta.url).pathname);

function arg(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : undefined;
}

// apiVersion -> module prefix holding one module per kind.
function modulePath(apiVersion, kind) {
  if (apiVersion === "v1") return `kubernetes-models/v1/${kind}`;
  if (apiVersion.startsWith("monitoring.coreos.com/")) {
    return `@kubernetes-models/prometheus-operator/${apiVersion}/${kind}`;
  }
  if (apiVersion.startsWith("cert-manager.io/")) {
    return `@kubernetes-models/cert-manager/${apiVersion}/${kind}`;
  }
  return `kubernetes-models/${apiVersion}/${kind}`;
}

const problems = [];
const manifests = arg("manifests") ? JSON.parse(fs.readFileSync(arg("manifests"), "utf8")) : [];
const dashboards = (arg("dashboards") || "").split(",").filter(Boolean);
const work = arg("work");
fs.mkdirSync(work, { recursive: true });

// 1. JSON-schema validation.
const kinds = new Map();
for (const { source, object } of manifests) {
  const { apiVersion, kind } = object;
  if (typeof apiVersion !== "string" || typeof kind !== "string") {
    problems.push(`${source}: apiVersion and kind must be strings`);
    continue;
  }
  let mod;
  try {
    mod = await import(modulePath(apiVersion, kind));
  } catch (e) {
    problems.push(`${source}: no schema for ${apiVersion} ${kind} (${e.code || e.message})`);
    continue;
  }
  kinds.set(`${apiVersion}/${kind}`, modulePath(apiVersion, kind));
  try {
    new mod[kind](object).validate();
  } catch (e) {
    problems.push(`${source}: ${apiVersion} ${kind}: ${e.message}`);
  }
}

// 2 + 3. One TypeScript program type-checks everything.
const lines = [];
const sourceOf = [];  // line number -> source, for diagnostics
const emit = (text, source) => {
  for (const l of text.split("\n")) {
    lines.push(l);
    sourceOf.push(source);
  }
};
let n = 0;
for (const [key, mod] of kinds) {
  emit(`import type { I${key.split("/").pop()} as T${n} } from ${JSON.stringify(mod)};`, "imports");
  kinds.set(key, `T${n++}`);
}
emit(`import type { Dashboard, DataQuery } from "@grafana/schema";`, "imports");
// JSON carries enum values as plain strings: Json<T> turns every string enum
// of T into the union of its values, keeping the rest (and excess-property
// checks) as is.
emit("type Json<T> = T extends string ? `${T}` : T extends Array<infer U> ? Array<Json<U>> : " +
     "T extends object ? { [K in keyof T]: Json<T[K]> } : T;", "imports");
emit(`import type { Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig } from ` +
     `"@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";`, "imports");
// Grafana's Prometheus query model (public/app/plugins/datasource/prometheus
// dataquery.cue): a DataQuery with these fields.
emit(`interface PrometheusQuery extends DataQuery { expr: string; legendFormat?: string; range?: boolean;
  instant?: boolean; exemplar?: boolean; format?: "time_series" | "table" | "heatmap";
  interval?: string; intervalFactor?: number; editorMode?: "code" | "builder"; }`, "imports");
manifests.forEach(({ source, object }, i) => {
  const t = kinds.get(`${object.apiVersion}/${object.kind}`);
  if (t) emit(`export const m${i}: ${t} = ${JSON.stringify(object, null, 1)};`, source);
});
dashboards.forEach((file, i) => {
  const d = JSON.parse(fs.readFileSync(file, "utf8"));
  const src = path.basename(file);
  emit(`export const d${i}: Json<Dashboard> = ${JSON.stringify(d, null, 1)};`, src);
  (d.panels || []).forEach((p, j) => {
    const where = `${src} panel ${p.id} "${p.title}"`;
    if (p.type === "timeseries") {
      emit(`export const d${i}p${j}o: Json<TimeSeriesOptions> = ${JSON.stringify(p.options ?? null)};`, where);
      emit(`export const d${i}p${j}c: Json<TimeSeriesFieldConfig> = ${JSON.stringify(p.fieldConfig?.defaults?.custom ?? {})};`, where);
    }
    if (p.datasource?.type === "prometheus") {
      emit(`export const d${i}p${j}t: PrometheusQuery[] = ${JSON.stringify(p.targets ?? [])};`, where);
    }
  });
});
const file = path.join(work, "check.ts");
fs.writeFileSync(file, lines.join("\n") + "\n");
const program = ts.createProgram([file], {
  strict: true, noEmit: true, skipLibCheck: true, target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.ESNext, moduleResolution: ts.ModuleResolutionKind.Bundler,
  typeRoots: [], types: [], baseUrl: here, paths: { "*": [path.join(here, "node_modules/*")] },
});
for (const d of ts.getPreEmitDiagnostics(program)) {
  const msg = ts.flattenDiagnosticMessageText(d.messageText, "\n  ");
  if (d.file) {
    const { line } = d.file.getLineAndCharacterOfPosition(d.start);
    problems.push(`${d.file.fileName === file ? sourceOf[line] : d.file.fileName} (check.ts:${line + 1}): ${msg}`);
  } else {
    problems.push(msg);
  }
}

for (const p of problems) console.log(p);
console.log(`validate.mjs: ${manifests.length} manifests (${kinds.size} kinds), ${dashboards.length} dashboards, ${problems.length} problems`);
process.exit(problems.length ? 1 : 0);
