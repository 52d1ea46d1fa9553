//! Builds the patched llama.cpp that logquant links against.
//!
//! 1. Copy the pristine `vendor/llama.cpp` into `$OUT_DIR/llama.cpp`.
//! 2. Overlay `patches/files/` (new files only: the LogQuant sources and header).
//! 3. Apply `patches/series/*.patch` in order with `git apply` (the small hooks into
//!    upstream files). A patch that no longer applies fails the build and is named.
//! 4. Compile with the `cc` crate's compiler, one object per source file, in parallel,
//!    with an object cache keyed by the content of the source, of every header in the
//!    tree and of the flags. Rust-only changes do not rerun this script; a change under
//!    `patches/` reruns it but recompiles only what the change can affect.
//! 5. Archive into `libllama_logquant.a` and tell cargo to link it.
//!
//! Bindings are not generated here: `src/sys/bindings.rs` is checked in and made by
//! `scripts/gen-bindings.sh` (bindgen needs libclang, which a fresh machine lacks).

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bumped when the cache key's meaning changes, so stale objects are never reused.
const CACHE_VERSION: &str = "1";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for path in ["vendor", "patches", "build.rs"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    // What the cc crate reads to pick the compiler and flags (we ask it not to print
    // these itself, so list them here).
    let target = env::var("TARGET").unwrap();
    let target_us = target.replace('-', "_");
    for base in ["CC", "CXX", "CFLAGS", "CXXFLAGS", "AR", "CRATE_CC_NO_DEFAULTS"] {
        for var in
            [base.to_string(), format!("{base}_{target}"), format!("{base}_{target_us}"), format!("TARGET_{base}")]
        {
            println!("cargo:rerun-if-env-changed={var}");
        }
    }
    println!("cargo:rerun-if-env-changed=LOGQUANT_CPU_TARGET");

    let backend = Backend::from_features();
    let tree = out.join("llama.cpp");
    prepare_tree(&root, &tree);

    let gen = out.join("generated");
    write_version_headers(&root, &gen);

    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    let units = source_units(&tree, backend, &target_arch);

    let flags = Flags::new(&tree, &gen, backend, &target_arch, &target_os);
    let cache = object_cache_dir(&out);
    let headers_hash = hash_headers(&[&tree, &gen]);
    let objects = compile_all(&tree, &gen, &units, &flags, &cache, headers_hash);

    let lib = out.join("libllama_logquant.a");
    archive(&lib, &objects);
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=llama_logquant");
    match target_os.as_str() {
        "macos" | "ios" => println!("cargo:rustc-link-lib=dylib=c++"),
        _ => {
            println!("cargo:rustc-link-lib=dylib=stdc++");
            println!("cargo:rustc-link-lib=dylib=pthread");
            println!("cargo:rustc-link-lib=dylib=m");
        }
    }
    println!("cargo:rustc-env=LOGQUANT_CPU_FLAGS={}", flags.cpu_target.join(" "));
}

/// The ggml backend compiled in beside the CPU one, chosen by cargo features.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Cpu,
    Cuda,
    Metal,
}

impl Backend {
    fn from_features() -> Backend {
        let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
        let metal = env::var_os("CARGO_FEATURE_METAL").is_some();
        match (cuda, metal) {
            (true, true) => fail("features `cuda` and `metal` exclude each other: pick one"),
            (true, false) => Backend::Cuda,
            (false, true) => Backend::Metal,
            (false, false) => Backend::Cpu,
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("\nlogquant build error: {msg}\n");
    panic!("logquant build error: {msg}");
}

/// Step 1–3: a fresh copy of vendor/, the new files, then the patch series.
fn prepare_tree(root: &Path, tree: &Path) {
    let vendor = root.join("vendor/llama.cpp");
    if !vendor.join("include/llama.h").exists() {
        fail("vendor/llama.cpp is missing or incomplete: run scripts/sync-vendor.sh");
    }
    if tree.exists() {
        fs::remove_dir_all(tree).unwrap_or_else(|e| fail(&format!("cannot clear {}: {e}", tree.display())));
    }
    copy_dir(&vendor, tree, &mut |_| Ok(()));

    // New files must be new: an overlay that shadowed an upstream file would be an
    // invisible patch. Changes to upstream files go through patches/series instead.
    let files = root.join("patches/files");
    if files.exists() {
        copy_dir(&files, tree, &mut |dst| {
            if dst.exists() {
                Err(format!(
                    "patches/files/{} would overwrite an upstream file; change upstream files with a patch in patches/series",
                    dst.strip_prefix(tree).unwrap().display()
                ))
            } else {
                Ok(())
            }
        });
    }

    let mut series: Vec<PathBuf> = fs::read_dir(root.join("patches/series"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    series.retain(|p| p.extension().is_some_and(|e| e == "patch"));
    series.sort();
    for patch in &series {
        let output = Command::new("git")
            .args(["apply", "--whitespace=nowarn", "-p1"])
            .arg(patch)
            .current_dir(tree)
            .env("GIT_DIR", "/nonexistent") // never consult a repository around OUT_DIR
            .output()
            .unwrap_or_else(|e| fail(&format!("cannot run `git apply` (is git installed?): {e}")));
        if !output.status.success() {
            fail(&format!(
                "patch {} no longer applies to vendor/llama.cpp:\n{}\nRebase it: see README.md, 'Moving to a newer llama.cpp'.",
                patch.file_name().unwrap().to_string_lossy(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
}

fn copy_dir(from: &Path, to: &Path, check: &mut dyn FnMut(&Path) -> Result<(), String>) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst, check);
        } else {
            check(&dst).unwrap_or_else(|e| fail(&e));
            fs::copy(&src, &dst).unwrap_or_else(|e| fail(&format!("copy {}: {e}", src.display())));
        }
    }
}

/// CMake's configure_file() would write these; the version comes from vendor/VERSION.
fn write_version_headers(root: &Path, gen: &Path) {
    let version_file = fs::read_to_string(root.join("vendor/VERSION")).unwrap_or_default();
    let field = |key: &str| {
        version_file
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| "unknown".into())
    };
    let crate_version = field("llama-cpp-sys-2 version:");
    let ggml_version = field("ggml version:");
    fs::create_dir_all(gen).unwrap();
    write_if_changed(
        &gen.join("ggml-version.h"),
        &format!("#pragma once\n#define GGML_VERSION \"{ggml_version}\"\n#define GGML_COMMIT \"llama-cpp-sys-2-{crate_version}\"\n"),
    );
    write_if_changed(
        &gen.join("llama-version.h"),
        &format!("#pragma once\n#define LLAMA_VERSION \"llama-cpp-sys-2-{crate_version}\"\n#define LLAMA_COMMIT \"llama-cpp-sys-2-{crate_version}\"\n"),
    );
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).unwrap();
    }
}

/// One source file to compile, relative to the tree.
struct Unit {
    path: PathBuf,
    cpp: bool,
}

fn source_units(tree: &Path, backend: Backend, target_arch: &str) -> Vec<Unit> {
    let mut rel: Vec<String> = [
        // ggml-base
        "ggml/src/ggml.c",
        "ggml/src/ggml.cpp",
        "ggml/src/ggml-alloc.c",
        "ggml/src/ggml-backend.cpp",
        "ggml/src/ggml-backend-meta.cpp",
        "ggml/src/ggml-opt.cpp",
        "ggml/src/ggml-threading.cpp",
        "ggml/src/ggml-quants.c",
        "ggml/src/gguf.cpp",
        "ggml/src/ggml-lq2.c", // logquant (patches/files)
        // ggml (backend registry)
        "ggml/src/ggml-backend-reg.cpp",
        "ggml/src/ggml-backend-dl.cpp",
        // ggml-cpu
        "ggml/src/ggml-cpu/ggml-cpu.c",
        "ggml/src/ggml-cpu/ggml-cpu.cpp",
        "ggml/src/ggml-cpu/repack.cpp",
        "ggml/src/ggml-cpu/hbm.cpp",
        "ggml/src/ggml-cpu/quants.c",
        "ggml/src/ggml-cpu/traits.cpp",
        "ggml/src/ggml-cpu/amx/amx.cpp",
        "ggml/src/ggml-cpu/amx/mmq.cpp",
        "ggml/src/ggml-cpu/tiled/tiled.cpp",
        "ggml/src/ggml-cpu/tiled/tiled-kernel.cpp",
        "ggml/src/ggml-cpu/binary-ops.cpp",
        "ggml/src/ggml-cpu/unary-ops.cpp",
        "ggml/src/ggml-cpu/vec.cpp",
        "ggml/src/ggml-cpu/ops.cpp",
        "ggml/src/ggml-cpu/llamafile/sgemm.cpp",
        "ggml/src/ggml-cpu/lq2-cpu.c",         // logquant (patches/files)
        "ggml/src/ggml-cpu/logquant-attn.cpp", // logquant (patches/files)
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match target_arch {
        "x86_64" => {
            rel.extend(["ggml/src/ggml-cpu/arch/x86/quants.c".into(), "ggml/src/ggml-cpu/arch/x86/repack.cpp".into()])
        }
        "aarch64" => {
            rel.extend(["ggml/src/ggml-cpu/arch/arm/quants.c".into(), "ggml/src/ggml-cpu/arch/arm/repack.cpp".into()])
        }
        other => {
            fail(&format!("target architecture {other} is not supported by logquant's build (x86_64 and aarch64 are)"))
        }
    }
    // llama: every .cpp of src/ and src/models/, including the logquant-*.cpp overlay.
    for dir in ["src", "src/models"] {
        let mut names: Vec<String> = fs::read_dir(tree.join(dir))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cpp"))
            .collect();
        names.sort();
        rel.extend(names.into_iter().map(|n| format!("{dir}/{n}")));
    }
    match backend {
        Backend::Cpu => {}
        Backend::Cuda => fail(
            "the `cuda` feature is designed but not built yet: the CUDA backend (issue 5) is not in this version. Build without --features cuda.",
        ),
        Backend::Metal => fail(
            "the `metal` feature is designed but not built yet: the Metal backend is not in this version. Build without --features metal.",
        ),
    }
    rel.into_iter().map(|r| Unit { cpp: !r.ends_with(".c"), path: PathBuf::from(r) }).collect()
}

struct Flags {
    c: cc::Tool,
    cxx: cc::Tool,
    common: Vec<String>,
    cpu_target: Vec<String>,
    /// `--version` of the C and C++ compilers: an upgrade in place invalidates the cache.
    versions: String,
}

impl Flags {
    fn new(tree: &Path, gen: &Path, backend: Backend, target_arch: &str, target_os: &str) -> Flags {
        // llama.cpp is always optimised, also in `cargo test` (debug) builds: a -O0
        // llama.cpp makes every test on a model many times slower.
        let tool = |cpp: bool| {
            cc::Build::new().cpp(cpp).opt_level(3).debug(false).warnings(false).cargo_metadata(false).get_compiler()
        };
        // The feature-test macros ggml's CMakeLists.txt sets per platform.
        let platform: &[&str] = match target_os {
            "linux" | "android" => &["-D_GNU_SOURCE", "-D_XOPEN_SOURCE=600"],
            "macos" | "ios" => &["-D_XOPEN_SOURCE=600", "-D_DARWIN_C_SOURCE"],
            _ => &["-D_XOPEN_SOURCE=600"],
        };
        let mut common: Vec<String> =
            ["-DNDEBUG", "-DGGML_USE_CPU", "-DGGML_USE_LLAMAFILE", "-DGGML_SCHED_MAX_COPIES=4", "-pthread", "-w"]
                .iter()
                .chain(platform)
                .map(|s| s.to_string())
                .collect();
        if backend == Backend::Cuda {
            common.push("-DGGML_USE_CUDA".into());
        }
        for inc in ["ggml/include", "ggml/src", "ggml/src/ggml-cpu", "include", "src"] {
            common.push(format!("-I{}", tree.join(inc).display()));
        }
        common.push(format!("-I{}", gen.display()));
        let (c, cxx) = (tool(false), tool(true));
        let version = |t: &cc::Tool| {
            Command::new(t.path())
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let versions = version(&c) + &version(&cxx);
        Flags { c, cxx, common, cpu_target: cpu_target_flags(target_arch), versions }
    }

    fn command(&self, unit: &Unit, src: &Path, obj: &Path) -> Command {
        let tool = if unit.cpp { &self.cxx } else { &self.c };
        let mut cmd = tool.to_command();
        cmd.arg(if unit.cpp { "-std=gnu++17" } else { "-std=gnu11" });
        cmd.args(&self.common).args(&self.cpu_target);
        cmd.arg("-c").arg(src).arg("-o").arg(obj);
        cmd
    }

    /// What determines the object besides the source text: compiler, its flags and
    /// ours. Paths into OUT_DIR are left out (they differ between `cargo build` and
    /// `cargo clippy` of the same code), and so is the environment.
    fn describe(&self, unit: &Unit, tree: &Path, gen: &Path) -> String {
        let tool = if unit.cpp { &self.cxx } else { &self.c };
        let mut key = format!("{}|{}|{}", tool.path().display(), self.versions, if unit.cpp { "c++" } else { "c" });
        for arg in tool
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .chain(self.common.iter().cloned())
            .chain(self.cpu_target.iter().cloned())
        {
            let arg = arg.replace(&tree.display().to_string(), "<tree>").replace(&gen.display().to_string(), "<gen>");
            key.push('|');
            key.push_str(&arg);
        }
        key
    }
}

/// The instruction set the CPU kernels are compiled for. The default must run on
/// other machines than the build machine (a binary built here also runs on the GPU
/// host): x86-64-v3 (AVX2, FMA, F16C; every x86-64 server since 2013). Set
/// LOGQUANT_CPU_TARGET=native for this machine's full set (AVX-512 where present),
/// or to any -march value.
fn cpu_target_flags(target_arch: &str) -> Vec<String> {
    let requested = env::var("LOGQUANT_CPU_TARGET").ok().filter(|s| !s.is_empty());
    let march = match (target_arch, requested.as_deref()) {
        (_, Some(value)) => value.to_string(),
        ("x86_64", None) => "x86-64-v3".into(),
        ("aarch64", None) => "armv8.2-a+fp16+dotprod".into(),
        _ => "native".into(),
    };
    vec![format!("-march={march}")]
}

/// Objects live outside OUT_DIR's per-run copy, shared by the debug and release
/// profiles of one target directory (the key holds the flags, so they never mix).
fn object_cache_dir(out: &Path) -> PathBuf {
    // OUT_DIR = <target>/<profile>/build/logquant-<hash>/out
    let target_dir = out.ancestors().nth(4).map(Path::to_path_buf).unwrap_or_else(|| out.join("objects"));
    let dir = target_dir.join("llama-objects");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// One hash over every header of the given folders (the tree and the generated
/// version headers): a change to any header recompiles everything.
fn hash_headers(dirs: &[&Path]) -> u64 {
    let mut h = DefaultHasher::new();
    for dir in dirs {
        let mut files = Vec::new();
        collect_files(
            dir,
            &mut |p| matches!(p.extension().and_then(|e| e.to_str()).unwrap_or(""), "h" | "hpp" | "inc" | "cuh"),
            &mut files,
        );
        files.sort();
        for f in files {
            h.write(f.strip_prefix(dir).unwrap().to_string_lossy().as_bytes());
            h.write(&fs::read(&f).unwrap());
        }
    }
    h.finish()
}

fn collect_files(dir: &Path, keep: &mut dyn FnMut(&Path) -> bool, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let p = entry.path();
        if entry.file_type().unwrap().is_dir() {
            collect_files(&p, keep, out);
        } else if keep(&p) {
            out.push(p);
        }
    }
}

/// Compile every unit (reusing cached objects), `NUM_JOBS` at a time.
fn compile_all(
    tree: &Path,
    gen: &Path,
    units: &[Unit],
    flags: &Flags,
    cache: &Path,
    headers_hash: u64,
) -> Vec<PathBuf> {
    let jobs: usize = env::var("NUM_JOBS").ok().and_then(|s| s.parse().ok()).unwrap_or(2).max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<PathBuf>>> = Mutex::new(vec![None; units.len()]);
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let compiled = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= units.len() || !errors.lock().unwrap().is_empty() {
                    break;
                }
                let unit = &units[i];
                let src = tree.join(&unit.path);
                let text = fs::read(&src).unwrap();
                let mut h = DefaultHasher::new();
                h.write(CACHE_VERSION.as_bytes());
                h.write(&text);
                h.write_u64(headers_hash);
                h.write(flags.describe(unit, tree, gen).as_bytes());
                let stem = unit.path.to_string_lossy().replace(['/', '.'], "_");
                let obj = cache.join(format!("{stem}-{:016x}.o", h.finish()));
                if !obj.exists() {
                    // A name of this process and unit: two builds sharing the cache
                    // (debug and release at once) never rename each other's half-written file.
                    let tmp = obj.with_extension(format!("{}.{i}.tmp", std::process::id()));
                    let output = flags.command(unit, &src, &tmp).output();
                    match output {
                        Ok(o) if o.status.success() => {
                            if fs::rename(&tmp, &obj).is_err() && !obj.exists() {
                                errors.lock().unwrap().push(format!("cannot store {}", obj.display()));
                            }
                            let _ = fs::remove_file(&tmp);
                            compiled.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(o) => errors.lock().unwrap().push(format!(
                            "compiling {} failed:\n{}",
                            unit.path.display(),
                            String::from_utf8_lossy(&o.stderr)
                        )),
                        Err(e) => errors.lock().unwrap().push(format!("cannot run the C/C++ compiler: {e}")),
                    }
                }
                results.lock().unwrap()[i] = Some(obj);
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    if !errors.is_empty() {
        fail(&errors.join("\n"));
    }
    // Visible with `cargo build -vv`: how much the object cache saved.
    println!(
        "llama.cpp: compiled {} of {} objects, the rest from the cache",
        compiled.load(Ordering::SeqCst),
        units.len()
    );
    results.into_inner().unwrap().into_iter().map(|o| o.unwrap()).collect()
}

fn archive(lib: &Path, objects: &[PathBuf]) {
    let _ = fs::remove_file(lib);
    let ar = cc::Build::new().get_archiver();
    let mut cmd = ar;
    cmd.arg("crs").arg(lib).args(objects);
    let status = cmd.status().unwrap_or_else(|e| fail(&format!("cannot run the archiver: {e}")));
    if !status.success() {
        fail("creating libllama_logquant.a failed");
    }
}
