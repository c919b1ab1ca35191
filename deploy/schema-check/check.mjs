// Validates Istio manifests against Istio's published CRD schemas (and
// Kubernetes objects, e.g. a ConfigMap or a Deployment, against npm
// `kubernetes-models` 5.1.0), as
// packaged in npm `@kubernetes-models/istio` 3.0.1 (generated from
// istio/istio 1.29.2 manifests/charts/base/files/crd-all.gen.yaml):
//   1. the package's validators (compiled from the CRDs' OpenAPI schemas:
//      types, enums, patterns, required fields, limits);
//   2. TypeScript's excess-property check against the package's interfaces,
//      which the OpenAPI validators skip: an unknown or misspelt field (that
//      the API server would prune or, with strict field validation, refuse)
//      is an error.
// Input: a JSON array of objects on stdin. Output: one line per problem;
// exit code 1 if there is any.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const here = path.dirname(fileURLToPath(import.meta.url));
const docs = JSON.parse(readFileSync(0, "utf8"));
const problems = [];

function modulePath(doc) {
  if (!doc.apiVersion.includes("/")) return `kubernetes-models/${doc.apiVersion}/${doc.kind}`;
  const [group, version] = doc.apiVersion.split("/");
  // Istio's groups; any other (apps/v1: Deployment) is a Kubernetes one.
  if (!group.endsWith("istio.io")) return `kubernetes-models/${group}/${version}/${doc.kind}`;
  return `@kubernetes-models/istio/${group}/${version}/${doc.kind}`;
}

const lines = [];
for (const [i, doc] of docs.entries()) {
  const name = `${doc.kind} ${doc.metadata?.namespace}/${doc.metadata?.name}`;
  let mod;
  try {
    mod = await import(modulePath(doc));
  } catch (e) {
    problems.push(`${name}: no schema for ${doc.apiVersion} ${doc.kind}`);
    continue;
  }
  try {
    new mod[doc.kind](doc).validate();
  } catch (e) {
    problems.push(`${name}: ${e.message}`);
  }
  lines.push(`import type { I${doc.kind} as T${i} } from "${modulePath(doc)}";`);
  lines.push(`export const doc${i}: T${i} = ${JSON.stringify(doc)};`);
}

// The type check runs on an in-memory file next to node_modules.
const file = path.join(here, "__manifests__.ts");
const source = lines.join("\n");
const options = { strict: true, noEmit: true, module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext, target: ts.ScriptTarget.ES2022,
  skipLibCheck: true, types: [] };
const host = ts.createCompilerHost(options);
const getSourceFile = host.getSourceFile;
host.getSourceFile = (f, lang, ...rest) =>
  f === file ? ts.createSourceFile(f, source, lang) : getSourceFile(f, lang, ...rest);
const fileExists = host.fileExists;
host.fileExists = (f) => f === file || fileExists(f);
const program = ts.createProgram([file], options, host);
for (const d of ts.getPreEmitDiagnostics(program)) {
  problems.push(`type check: ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`);
}

for (const p of problems) console.log(p);
if (problems.length === 0) console.log(`${docs.length} objects valid`);
process.exit(problems.length ? 1 : 0);
