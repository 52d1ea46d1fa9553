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
const CACHE_VERSION: &str = "3";

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

    let flags = Flags::new(&tree, &gen, &out, backend, &target_arch, &target_os);
    let cache = object_cache_dir(&out);
    let scanner = IncludeScanner::new(&tree, &gen);
    let objects = compile_all(&tree, &gen, &units, &flags, &cache, &scanner);

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
    if let Some(tk) = &flags.cuda {
        tk.link(&out);
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

/// The language of a source file, and so its compiler.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lang {
    C,
    Cpp,
    Cuda,
}

/// One source file to compile, relative to the tree.
struct Unit {
    path: PathBuf,
    lang: Lang,
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
    check_unlisted(tree, &rel, target_arch);
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
        Backend::Cuda => rel.extend(cuda_sources(tree)),
        Backend::Metal => fail(
            "the `metal` feature is designed but not built yet: the Metal backend is not in this version. Build without --features metal.",
        ),
    }
    rel.into_iter()
        .map(|r| {
            let lang = if r.ends_with(".cu") {
                Lang::Cuda
            } else if r.ends_with(".c") {
                Lang::C
            } else {
                Lang::Cpp
            };
            Unit { lang, path: PathBuf::from(r) }
        })
        .collect()
}

/// Sources of ggml's CPU build that are deliberately not compiled, with why.
const NOT_BUILT: [(&str, &str); 2] = [
    ("ggml/src/ggml-cpu/arch/x86/cpu-feats.cpp", "CPU-variant detection of GGML_CPU_ALL_VARIANTS builds"),
    ("ggml/src/ggml-cpu/arch/arm/cpu-feats.cpp", "CPU-variant detection of GGML_CPU_ALL_VARIANTS builds"),
];

/// ggml's base and CPU sources are listed by hand (as its CMakeLists.txt picks them): a
/// newer llama.cpp that adds one would fail at link time with undefined symbols. Fail
/// here instead, naming the file, unless it is listed or in NOT_BUILT.
fn check_unlisted(tree: &Path, listed: &[String], target_arch: &str) {
    let arch = if target_arch == "x86_64" { "x86" } else { "arm" };
    let dirs = [
        "ggml/src".to_string(),
        "ggml/src/ggml-cpu".into(),
        "ggml/src/ggml-cpu/amx".into(),
        "ggml/src/ggml-cpu/tiled".into(),
        "ggml/src/ggml-cpu/llamafile".into(),
        format!("ggml/src/ggml-cpu/arch/{arch}"),
    ];
    for dir in dirs {
        let Ok(entries) = fs::read_dir(tree.join(&dir)) else { continue };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".c") || name.ends_with(".cpp")) {
                continue;
            }
            let rel = format!("{dir}/{name}");
            if !listed.contains(&rel) && !NOT_BUILT.iter().any(|(f, _)| *f == rel) {
                fail(&format!(
                    "{rel} is in the vendored llama.cpp but neither compiled nor in NOT_BUILT (build.rs, source_units): add it to one of them as ggml's CMakeLists.txt decides"
                ));
            }
        }
    }
}

/// The flash-attention K-V type pairs whose vector kernels are compiled: llama.cpp's
/// CMake default (GGML_CUDA_FA_QUANTS), so the stock cache types run as upstream's do.
const CUDA_FA_PAIRS: [&str; 4] = ["f16-f16", "q4_0-q4_0", "q8_0-q8_0", "bf16-bf16"];
const CUDA_FA_TYPES: [&str; 7] = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16"];

/// ggml-cuda's sources, chosen as its CMakeLists.txt does (with LogQuant's .cu files,
/// which patches/files puts in the same folder).
fn cuda_sources(tree: &Path) -> Vec<String> {
    let dir = "ggml/src/ggml-cuda";
    let list = |sub: &str, keep: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(tree.join(dir).join(sub))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu") && keep(n))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| if sub.is_empty() { format!("{dir}/{n}") } else { format!("{dir}/{sub}/{n}") })
            .collect()
    };
    let mut out = list("", &|_| true);
    out.extend(list("template-instances", &|n| {
        ["fattn-tile", "fattn-mma", "mmq", "mmf"].iter().any(|p| n.starts_with(p))
            || CUDA_FA_PAIRS.iter().any(|pair| n == format!("fattn-vec-instance-{pair}.cu"))
    }));
    out
}

/// Where the CUDA toolkit is: LOGQUANT_CUDA_PATH, CUDA_PATH or CUDA_HOME, else the
/// folder above the `nvcc` on PATH, else /usr/local/cuda.
struct CudaToolkit {
    nvcc: PathBuf,
    include: PathBuf,
    lib: PathBuf,
    /// libcuda (the driver) can be linked: ggml's virtual-memory pool is used.
    driver: bool,
    archs: Vec<String>,
}

impl CudaToolkit {
    fn find(out: &Path) -> CudaToolkit {
        for var in ["LOGQUANT_CUDA_PATH", "CUDA_PATH", "CUDA_HOME", "LOGQUANT_CUDA_ARCHS", "PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let from_env = ["LOGQUANT_CUDA_PATH", "CUDA_PATH", "CUDA_HOME"]
            .iter()
            .find_map(|v| env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from));
        let from_path = || {
            env::var_os("PATH").and_then(|paths| {
                env::split_paths(&paths)
                    .find(|p| p.join("nvcc").is_file())
                    .and_then(|bin| bin.parent().map(Path::to_path_buf))
            })
        };
        let root = from_env.or_else(from_path).unwrap_or_else(|| PathBuf::from("/usr/local/cuda"));
        let nvcc = root.join("bin/nvcc");
        if !nvcc.is_file() {
            fail(&format!(
                "the `cuda` feature needs the CUDA toolkit (13.0, or 12.x from 12.4): no nvcc at {}. \
                 Set CUDA_PATH to the toolkit, put its bin/ on PATH, or run scripts/cuda-toolkit.sh \
                 (installs NVIDIA's CUDA 13.0 wheels from PyPI into .cuda/) and set CUDA_PATH=$PWD/.cuda.",
                nvcc.display()
            ));
        }
        let include = root.join("include");
        let lib = ["lib64", "lib", "targets/x86_64-linux/lib"]
            .iter()
            .map(|d| root.join(d))
            .find(|d| {
                d.join("libcudart.so").exists()
                    || d.join("libcudart.so.13").exists()
                    || d.join("libcudart.so.12").exists()
            })
            .unwrap_or_else(|| fail(&format!("no libcudart in the CUDA toolkit at {}", root.display())));
        // Pip's wheels ship only the versioned names (libcudart.so.13): link those
        // through unversioned links of our own.
        let links = out.join("cuda-lib");
        fs::create_dir_all(&links).unwrap();
        for name in ["cudart", "cublas", "cublasLt"] {
            let plain = lib.join(format!("lib{name}.so"));
            if plain.exists() {
                continue;
            }
            let versioned =
                ["13", "12"].iter().map(|v| lib.join(format!("lib{name}.so.{v}"))).find(|p| p.exists()).unwrap_or_else(
                    || fail(&format!("no lib{name}.so in {}: install cuBLAS with the toolkit", lib.display())),
                );
            let link = links.join(format!("lib{name}.so"));
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&versioned, &link).unwrap();
        }
        let driver = lib.join("libcuda.so").exists() || lib.join("stubs/libcuda.so").exists();
        let archs: Vec<String> = env::var("LOGQUANT_CUDA_ARCHS")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "90".into())
            .split([',', ';', ' '])
            .filter(|s| !s.is_empty())
            .map(|s| s.to_string())
            .collect();
        for a in &archs {
            if !a.chars().all(|c| c.is_ascii_digit()) || a.len() < 2 {
                fail(&format!("LOGQUANT_CUDA_ARCHS: `{a}` is not a compute capability like 90 (H100/H200) or 86"));
            }
        }
        CudaToolkit { nvcc, include, lib, driver, archs }
    }

    fn link(&self, out: &Path) {
        println!("cargo:rustc-link-search=native={}", out.join("cuda-lib").display());
        println!("cargo:rustc-link-search=native={}", self.lib.display());
        if self.lib.join("stubs").exists() {
            println!("cargo:rustc-link-search=native={}", self.lib.join("stubs").display());
        }
        for lib in ["cudart", "cublas", "cublasLt"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
        if self.driver {
            println!("cargo:rustc-link-lib=dylib=cuda");
        }
        // The toolkit's libraries for runs on the build machine; elsewhere the system's.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", self.lib.display());
    }

    /// nvcc's own flags: llama.cpp's CMake ones (fast math, extended lambdas, compressed
    /// fat binaries), machine code plus PTX for each architecture.
    fn flags(&self) -> Vec<String> {
        let mut f: Vec<String> =
            ["-O3", "-std=c++17", "-use_fast_math", "-extended-lambda", "-compress-mode=size", "-w"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        f.push("-Xcompiler=-fPIC,-w".into());
        for a in &self.archs {
            f.push(format!("-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]"));
        }
        f.push("-DGGML_CUDA_USE_GRAPHS".into());
        if !self.driver {
            f.push("-DGGML_CUDA_NO_VMM".into());
        }
        f.push(format!("-DGGML_CUDA_FA_QUANTS=\"{}\"", CUDA_FA_PAIRS[1..].join(",")));
        for tv in CUDA_FA_TYPES {
            for tk in CUDA_FA_TYPES {
                let on = CUDA_FA_PAIRS.contains(&format!("{tk}-{tv}").as_str());
                f.push(format!("-DGGML_CUDA_FA_{}_{}={}", tk.to_uppercase(), tv.to_uppercase(), on as u8));
            }
        }
        f.push(format!("-I{}", self.include.display()));
        f
    }
}

struct Flags {
    c: cc::Tool,
    cxx: cc::Tool,
    common: Vec<String>,
    cpu_target: Vec<String>,
    cuda: Option<CudaToolkit>,
    /// `--version` of the compilers: an upgrade in place invalidates the cache.
    versions: String,
}

impl Flags {
    fn new(tree: &Path, gen: &Path, out: &Path, backend: Backend, target_arch: &str, target_os: &str) -> Flags {
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
            ["-DNDEBUG", "-DGGML_USE_CPU", "-DGGML_USE_LLAMAFILE", "-DGGML_SCHED_MAX_COPIES=4", "-w"]
                .iter()
                .chain(platform)
                .map(|s| s.to_string())
                .collect();
        let cuda = (backend == Backend::Cuda).then(|| CudaToolkit::find(out));
        if cuda.is_some() {
            common.push("-DGGML_USE_CUDA".into());
        }
        for inc in include_dirs(tree, gen) {
            common.push(format!("-I{}", inc.display()));
        }
        let (c, cxx) = (tool(false), tool(true));
        let version = |p: &Path| {
            Command::new(p)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let mut versions = version(c.path()) + &version(cxx.path());
        if let Some(tk) = &cuda {
            versions += &version(&tk.nvcc);
        }
        Flags { c, cxx, common, cpu_target: cpu_target_flags(target_arch), cuda, versions }
    }

    /// The compiler and its arguments for a unit, without the source and object paths.
    fn argv(&self, unit: &Unit) -> (PathBuf, Vec<String>) {
        let host = |t: &cc::Tool| t.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>();
        match unit.lang {
            Lang::C | Lang::Cpp => {
                let tool = if unit.lang == Lang::Cpp { &self.cxx } else { &self.c };
                let mut args = host(tool);
                args.push(if unit.lang == Lang::Cpp { "-std=gnu++17" } else { "-std=gnu11" }.into());
                args.push("-pthread".into());
                args.extend(self.common.iter().cloned());
                args.extend(self.cpu_target.iter().cloned());
                (tool.path().to_path_buf(), args)
            }
            Lang::Cuda => {
                let tk = self.cuda.as_ref().expect("a .cu unit in a build without CUDA");
                let mut args = vec![format!("-ccbin={}", self.cxx.path().display())];
                args.extend(tk.flags());
                args.extend(self.common.iter().cloned());
                (tk.nvcc.clone(), args)
            }
        }
    }

    fn command(&self, unit: &Unit, src: &Path, obj: &Path) -> Command {
        let (program, args) = self.argv(unit);
        let mut cmd = Command::new(program);
        cmd.args(args).arg("-c").arg(src).arg("-o").arg(obj);
        cmd
    }

    /// What determines the object besides the source text: compiler, its flags and
    /// ours. Paths into OUT_DIR are left out (they differ between `cargo build` and
    /// `cargo clippy` of the same code), and so is the environment.
    fn describe(&self, unit: &Unit, tree: &Path, gen: &Path) -> String {
        let (program, args) = self.argv(unit);
        let mut key = format!("{}|{}", program.display(), self.versions);
        for arg in args {
            let arg = arg.replace(&tree.display().to_string(), "<tree>").replace(&gen.display().to_string(), "<gen>");
            key.push('|');
            key.push_str(&arg);
        }
        key
    }
}

/// The folders searched for quoted and angled includes of the tree's own headers.
fn include_dirs(tree: &Path, gen: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        ["ggml/include", "ggml/src", "ggml/src/ggml-cpu", "include", "src"].iter().map(|d| tree.join(d)).collect();
    dirs.push(gen.to_path_buf());
    dirs
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

/// The hash of every header of the tree a source includes, directly or through other
/// headers (quoted or angled includes found beside the includer or in the include
/// folders; conditional ones count too). A change to a header recompiles only the
/// units that can see it: LogQuant's headers do not rebuild ggml-cuda's 140 units.
struct IncludeScanner {
    dirs: Vec<PathBuf>,
    /// The tree, canonical: header names in the key are relative to it.
    tree: PathBuf,
    /// Per file (canonical path): the tree's headers it includes itself (canonical),
    /// and the hash of its name and content. Each file is read once per build.
    files: Mutex<std::collections::HashMap<PathBuf, (Vec<PathBuf>, u64)>>,
}

impl IncludeScanner {
    fn new(tree: &Path, gen: &Path) -> IncludeScanner {
        IncludeScanner {
            dirs: include_dirs(tree, gen),
            tree: fs::canonicalize(tree).unwrap_or_else(|_| tree.to_path_buf()),
            files: Mutex::new(Default::default()),
        }
    }

    /// The headers `file` includes itself, and its own hash.
    fn scan(&self, file: &Path) -> (Vec<PathBuf>, u64) {
        if let Some(found) = self.files.lock().unwrap().get(file) {
            return found.clone();
        }
        let bytes = fs::read(file).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut includes = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.trim_start().strip_prefix('#') else { continue };
            let Some(rest) = rest.trim_start().strip_prefix("include") else { continue };
            let rest = rest.trim();
            let name = match rest.chars().next() {
                Some('"') => rest[1..].split('"').next(),
                Some('<') => rest[1..].split('>').next(),
                _ => None,
            };
            let Some(name) = name else { continue };
            let here = file.parent().map(|d| d.join(name));
            if let Some(p) = here.into_iter().chain(self.dirs.iter().map(|d| d.join(name))).find(|p| p.is_file()) {
                includes.push(fs::canonicalize(&p).unwrap_or(p));
            }
        }
        // relative names: the key must not depend on where OUT_DIR is
        let name = file.strip_prefix(&self.tree).map(|p| p.to_string_lossy().into_owned());
        let mut hasher = DefaultHasher::new();
        hasher.write(name.unwrap_or_else(|_| file.file_name().unwrap().to_string_lossy().into_owned()).as_bytes());
        hasher.write(&bytes);
        let found = (includes, hasher.finish());
        self.files.lock().unwrap().insert(file.to_path_buf(), found.clone());
        found
    }

    /// The hash of every header `src` includes, directly or not.
    fn hash(&self, src: &Path) -> u64 {
        let mut seen = std::collections::BTreeMap::new();
        let mut todo = self.scan(src).0;
        while let Some(h) = todo.pop() {
            if let std::collections::btree_map::Entry::Vacant(slot) = seen.entry(h) {
                let (includes, hash) = self.scan(slot.key());
                slot.insert(hash);
                todo.extend(includes);
            }
        }
        let mut hasher = DefaultHasher::new();
        for hash in seen.values() {
            hasher.write_u64(*hash);
        }
        hasher.finish()
    }
}

/// Compile every unit (reusing cached objects), `NUM_JOBS` at a time.
fn compile_all(
    tree: &Path,
    gen: &Path,
    units: &[Unit],
    flags: &Flags,
    cache: &Path,
    scanner: &IncludeScanner,
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
                h.write_u64(scanner.hash(&src));
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
