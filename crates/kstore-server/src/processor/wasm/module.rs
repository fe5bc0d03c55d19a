//! Loading a module: read, compile, check that it imports nothing and exports what the guest
//! ABI asks for, and that it instantiates within its limits and speaks this node's ABI
//! version. Each failure is a [`ModuleError`] that names the file and what is wrong.

use std::path::{Path, PathBuf};

use kstore_guest::ABI_VERSION;
use kstore_guest::abi::{EXPORT_ABI_VERSION, EXPORT_FOLD, EXPORT_INPUT, EXPORT_PANIC_MESSAGE};
use wasmtime::{
    Engine, ExternType, FuncType, Instance, InstancePre, Linker, Memory, Module, OptLevel,
    ResourceLimiter, Store, Trap, TypedFunc, ValType, WasmParams, WasmResults,
};

use super::WasmLimits;

/// Why a module cannot be used. Each names the module's file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// The file cannot be read.
    #[error("cannot read the WebAssembly module {path}: {source}")]
    Read {
        /// The module's file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly module this node can compile.
    #[error("{path} is not a WebAssembly module this node can run: {reason}")]
    Compile {
        /// The module's file.
        path: PathBuf,
        /// Why, as the compiler says.
        reason: String,
    },
    /// The module imports something: a kstore module may import nothing.
    #[error(
        "{path} imports {module}::{name}: a kstore module may import nothing (no clock, no \
         randomness, no I/O); build it for wasm32-unknown-unknown with kstore-guest"
    )]
    Import {
        /// The module's file.
        path: PathBuf,
        /// The import's module.
        module: String,
        /// The import's name.
        name: String,
    },
    /// An export the guest ABI asks for is missing or has another type.
    #[error(
        "{path} does not export {export} as {expected} (kstore guest ABI {ABI_VERSION}): {found}"
    )]
    Export {
        /// The module's file.
        path: PathBuf,
        /// The export's name.
        export: &'static str,
        /// What it must be.
        expected: &'static str,
        /// What the module has instead.
        found: String,
    },
    /// The module speaks another version of the guest ABI.
    #[error(
        "{path} speaks kstore guest ABI version {found}; this node speaks version {ABI_VERSION}"
    )]
    AbiVersion {
        /// The module's file.
        path: PathBuf,
        /// The version the module returned.
        found: i32,
    },
    /// The module cannot be instantiated within its limits, or traps while it starts.
    #[error("{path} cannot be instantiated: {reason}")]
    Instantiate {
        /// The module's file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A compiled module whose imports and exports follow the guest ABI, ready to instantiate.
pub struct LoadedModule {
    path: PathBuf,
    digest: String,
    limits: WasmLimits,
    pre: InstancePre<GuestState>,
    has_panic_message: bool,
    /// How long cranelift took to compile it.
    compile_time: std::time::Duration,
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("path", &self.path)
            .field("digest", &self.digest)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A live instance of a module, with its store.
pub(super) struct Live {
    pub store: Store<GuestState>,
    pub memory: Memory,
    pub abi_version: TypedFunc<(), i32>,
    pub input: TypedFunc<i32, i32>,
    pub fold: TypedFunc<i32, i64>,
    pub panic_message: Option<TypedFunc<(), i64>>,
}

/// What a store holds beside the instance: its memory limiter.
pub(super) struct GuestState {
    pub limiter: MemoryLimiter,
}

/// Caps an instance's linear memory and remembers that it refused to grow it.
pub(super) struct MemoryLimiter {
    max_bytes: usize,
    /// Whether a growth was refused since the flag was last cleared.
    pub refused: bool,
}

/// The most table elements an instance may have (function pointers of a Rust module).
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        let allowed = desired <= self.max_bytes;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> anyhow::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }
}

/// The engine every module runs on: cranelift, fuel on, and the settings that make a
/// module's results the same on every machine (canonical NaNs, deterministic relaxed SIMD,
/// no threads: wasmtime is built without them, so a shared memory does not compile).
fn engine() -> anyhow::Result<Engine> {
    let mut config = wasmtime::Config::new();
    config
        .consume_fuel(true)
        .cranelift_opt_level(OptLevel::Speed)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true);
    Engine::new(&config)
}

impl LoadedModule {
    /// Reads, compiles and checks the module in `path`.
    pub fn load(path: &Path, limits: WasmLimits) -> Result<Self, ModuleError> {
        Self::from_bytes(path, &Self::read(path)?, limits)
    }

    /// Reads the module file in `path`.
    pub fn read(path: &Path) -> Result<Vec<u8>, ModuleError> {
        std::fs::read(path).map_err(|source| ModuleError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// Compiles and checks a module's bytes; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8], limits: WasmLimits) -> Result<Self, ModuleError> {
        let path = path.to_owned();
        let compile_error = |reason: String| ModuleError::Compile {
            path: path.clone(),
            reason,
        };
        let engine = engine().map_err(|error| compile_error(format!("{error:#}")))?;
        let compiling = std::time::Instant::now();
        let module =
            Module::new(&engine, bytes).map_err(|error| compile_error(format!("{error:#}")))?;
        let compile_time = compiling.elapsed();
        if let Some(import) = module.imports().next() {
            return Err(ModuleError::Import {
                path,
                module: import.module().to_owned(),
                name: import.name().to_owned(),
            });
        }
        let check = |export: &'static str,
                     expected: &'static str,
                     ok: &dyn Fn(&ExternType) -> bool| {
            match module.get_export(export) {
                Some(found) if ok(&found) => Ok(()),
                found => Err(ModuleError::Export {
                    path: path.clone(),
                    export,
                    expected,
                    found: found.map_or_else(|| "not exported".into(), |found| describe(&found)),
                }),
            }
        };
        check(
            "memory",
            "a 32-bit memory",
            &|e| matches!(e, ExternType::Memory(m) if !m.is_64() && !m.is_shared()),
        )?;
        check(EXPORT_ABI_VERSION, "a function () -> i32", &|e| {
            is_func(e, &[], &[ValType::I32])
        })?;
        check(EXPORT_INPUT, "a function (i32) -> i32", &|e| {
            is_func(e, &[ValType::I32], &[ValType::I32])
        })?;
        check(EXPORT_FOLD, "a function (i32) -> i64", &|e| {
            is_func(e, &[ValType::I32], &[ValType::I64])
        })?;
        let has_panic_message = match module.get_export(EXPORT_PANIC_MESSAGE) {
            None => false,
            Some(_) => {
                check(EXPORT_PANIC_MESSAGE, "a function () -> i64", &|e| {
                    is_func(e, &[], &[ValType::I64])
                })?;
                true
            }
        };
        let pre = Linker::new(&engine)
            .instantiate_pre(&module)
            .map_err(|error| ModuleError::Instantiate {
                path: path.clone(),
                reason: format!("{error:#}"),
            })?;
        let loaded = LoadedModule {
            digest: sha256_hex(bytes),
            path,
            limits,
            pre,
            has_panic_message,
            compile_time,
        };
        // Once now, so that a module that cannot start or speaks another ABI is refused when
        // the node starts rather than on its first record.
        let mut live = loaded
            .instantiate()
            .map_err(|reason| ModuleError::Instantiate {
                path: loaded.path.clone(),
                reason,
            })?;
        let version = live
            .store
            .set_fuel(limits.fuel_per_record)
            .and_then(|()| live.abi_version.call(&mut live.store, ()))
            .map_err(|error| ModuleError::Instantiate {
                path: loaded.path.clone(),
                reason: format!("{EXPORT_ABI_VERSION} failed: {}", trap_reason(&error)),
            })?;
        if version != ABI_VERSION {
            return Err(ModuleError::AbiVersion {
                path: loaded.path,
                found: version,
            });
        }
        Ok(loaded)
    }

    /// The module's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The module's identity: the SHA-256 of its bytes, in lowercase hex (as `sha256sum`
    /// prints it).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// How long compiling it took.
    pub fn compile_time(&self) -> std::time::Duration {
        self.compile_time
    }

    /// The limits its calls run under.
    pub fn limits(&self) -> WasmLimits {
        self.limits
    }

    /// Returns a fresh instance, or why it cannot start (its initial memory above the
    /// limit, a start function that traps).
    pub(super) fn instantiate(&self) -> Result<Live, String> {
        let mut store = Store::new(
            self.pre.module().engine(),
            GuestState {
                limiter: MemoryLimiter {
                    max_bytes: usize::try_from(self.limits.max_memory_bytes).unwrap_or(usize::MAX),
                    refused: false,
                },
            },
        );
        store.limiter(|state| &mut state.limiter);
        store
            .set_fuel(self.limits.fuel_per_record)
            .map_err(|error| error.to_string())?;
        let instance = self.pre.instantiate(&mut store).map_err(|error| {
            if store.data().limiter.refused {
                format!(
                    "its initial memory is larger than processor.max-memory-bytes ({} bytes)",
                    self.limits.max_memory_bytes
                )
            } else {
                trap_reason(&error)
            }
        })?;
        let abi_version = typed(&instance, &mut store, EXPORT_ABI_VERSION)?;
        let input = typed(&instance, &mut store, EXPORT_INPUT)?;
        let fold = typed(&instance, &mut store, EXPORT_FOLD)?;
        let panic_message = if self.has_panic_message {
            Some(typed(&instance, &mut store, EXPORT_PANIC_MESSAGE)?)
        } else {
            None
        };
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| "memory: not exported".to_owned())?;
        Ok(Live {
            store,
            memory,
            abi_version,
            input,
            fold,
            panic_message,
        })
    }
}

/// Returns an instance's export `name` as a function of the given type.
fn typed<Params: WasmParams, Results: WasmResults>(
    instance: &Instance,
    store: &mut Store<GuestState>,
    name: &str,
) -> Result<TypedFunc<Params, Results>, String> {
    instance
        .get_typed_func(store, name)
        .map_err(|error| format!("{name}: {error:#}"))
}

fn is_func(export: &ExternType, params: &[ValType], results: &[ValType]) -> bool {
    let ExternType::Func(func) = export else {
        return false;
    };
    same_types(func.params(), params) && same_types(func.results(), results)
}

fn same_types(found: impl ExactSizeIterator<Item = ValType>, expected: &[ValType]) -> bool {
    found.len() == expected.len()
        && found
            .zip(expected)
            .all(|(found, expected)| ValType::eq(&found, expected))
}

fn describe(export: &ExternType) -> String {
    match export {
        ExternType::Func(func) => format!("a function {}", signature(func)),
        ExternType::Memory(memory) if memory.is_64() => "a 64-bit memory".into(),
        ExternType::Memory(memory) if memory.is_shared() => "a shared memory".into(),
        ExternType::Memory(_) => "a memory".into(),
        ExternType::Global(_) => "a global".into(),
        ExternType::Table(_) => "a table".into(),
        ExternType::Tag(_) => "a tag".into(),
    }
}

fn signature(func: &FuncType) -> String {
    let list = |types: &mut dyn Iterator<Item = ValType>| {
        types.map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    };
    format!(
        "({}) -> {}",
        list(&mut func.params()),
        list(&mut func.results())
    )
}

/// Returns a call's failure in words: the trap's, else the error's.
pub(super) fn trap_reason(error: &anyhow::Error) -> String {
    match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    }
}

/// The SHA-256 of `bytes` in lowercase hex: a module's identity.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
