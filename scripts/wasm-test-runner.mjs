#!/usr/bin/env node
// Runs a wasm32-wasip1 test binary (`cargo test --target wasm32-wasip1`)
// under Node's built-in WASI. Set as the cargo runner in .cargo/config.toml.
//
//   node scripts/wasm-test-runner.mjs <file.wasm> [args...]
//
// The crate's lib carries `proxy_wasm::main!`, so the test binary imports the
// proxy-wasm host ABI (`env.proxy_*`) and exports `_initialize` next to
// `_start`. Every `env` function import gets a silent stub returning 1
// (proxy-wasm `Status::NotFound`); `_initialize` is never called (it would
// register the root context and call `__wasm_call_ctors` a second time):
// only `_start` runs, through `wasi.start`. argv is passed through (name
// filters, `--nocapture`, ...), nothing is preopened, and the exit code comes
// back: a panic in wasm aborts (`unreachable` trap) and exits non-zero.

import { spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

// Node 20 sometimes dies with SIGSEGV in its WASI exit path after the test
// binary has run every test and printed its summary (no wasm trap; it comes
// and goes with the binary's layout). So the tests run in a child process and
// this parent passes their output through: a child killed by a signal after a
// summary with "0 failed" as its last line ends like the harness would have
// (exit 0), said on stderr; any other crash, or a failed test, fails.
if (!process.env.TOLLGATE_WASM_CHILD) {
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), ...process.argv.slice(2)], {
    env: { ...process.env, TOLLGATE_WASM_CHILD: "1" },
    stdio: ["inherit", "pipe", "inherit"],
  });
  let tail = "";
  child.stdout.on("data", (chunk) => {
    process.stdout.write(chunk);
    tail = (tail + chunk.toString()).slice(-4096);
  });
  child.on("close", (code, signal) => {
    const last = tail.trim().split("\n").pop() ?? "";
    const passed = /^test result: ok\. \d+ passed; 0 failed;/.test(last);
    if (signal && passed) {
      process.stderr.write(`wasm-test-runner: Node died (${signal}) after the tests had passed; their summary stands\n`);
      process.exit(0);
    }
    process.exit(code ?? 134);
  });
} else {

// Node 20 flags WASI as experimental on every run: keep that line out of the
// test output (other warnings still show).
const emitWarning = process.emitWarning;
process.emitWarning = function (warning, ...rest) {
  const text = typeof warning === "string" ? warning : warning?.message;
  if (typeof text === "string" && text.startsWith("WASI is an experimental")) return;
  return emitWarning.call(this, warning, ...rest);
};
const { WASI } = await import("node:wasi");

const NOT_FOUND = 1; // proxy_wasm::types::Status::NotFound

async function main() {
  const [file, ...args] = process.argv.slice(2);
  if (!file) {
    process.stderr.write("usage: wasm-test-runner.mjs <file.wasm> [args...]\n");
    return 2;
  }
  const module = await WebAssembly.compile(await readFile(file));

  const wasi = new WASI({
    version: "preview1",
    args: [basename(file), ...args],
    env: process.env,
    preopens: {},
    returnOnExit: true,
  });

  const imports = { wasi_snapshot_preview1: wasi.wasiImport };
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.module === "wasi_snapshot_preview1") continue;
    if (imp.module !== "env" || imp.kind !== "function") {
      process.stderr.write(
        `wasm-test-runner: unsupported import ${imp.module}.${imp.name} (${imp.kind})\n`,
      );
      return 2;
    }
    imports.env ??= {};
    imports.env[imp.name] = () => NOT_FOUND;
  }

  const instance = await WebAssembly.instantiate(module, imports);
  // wasi.start refuses an instance exporting `_initialize`: hand it a view of
  // the exports without it.
  const { _initialize, ...exports } = instance.exports;
  void _initialize;
  if (typeof exports._start !== "function") {
    process.stderr.write(`wasm-test-runner: ${file} exports no _start\n`);
    return 2;
  }
  return wasi.start({ exports });
}

main().then(
  (code) => {
    process.exitCode = code ?? 0;
  },
  (err) => {
    // A trap lands here: `unreachable` after a panic (panics abort on
    // wasm32-wasip1, taking the whole test binary down), or any other
    // RuntimeError. Exit like an abort.
    if (err instanceof WebAssembly.RuntimeError) {
      process.stderr.write(`wasm-test-runner: wasm trap: ${err.message}\n`);
      if (process.env.RUST_BACKTRACE) process.stderr.write(`${err.stack}\n`);
    } else {
      process.stderr.write(`wasm-test-runner: ${err?.stack ?? err}\n`);
    }
    process.exitCode = 134;
  },
);
}
