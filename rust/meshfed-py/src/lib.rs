//! `meshfed._core`: the thin PyO3 binding of the meshfed gateway.
//!
//! Python builds a config document (JSON bytes); everything else happens in
//! `meshfed-gateway`. The GIL is released around every call that may block
//! (start, apply, close), and the data plane never calls back into Python:
//! its log events reach Python's `logging` through one thread of their own
//! (`logging`).

mod logging;

use std::collections::BTreeMap;
use std::sync::Mutex;

use meshfed_gateway::GatewayError as CoreError;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    meshfed._core,
    ConfigError,
    PyValueError,
    "The gateway config document is invalid; the message names the field path."
);
create_exception!(
    meshfed._core,
    GatewayError,
    PyRuntimeError,
    "The gateway could not start, bind a listener, or is closed."
);

/// Maps a gateway error to `ConfigError` or `GatewayError`.
fn to_py(err: CoreError) -> PyErr {
    match err {
        CoreError::Config(e) => ConfigError::new_err(e.to_string()),
        other => GatewayError::new_err(other.to_string()),
    }
}

/// The version of the Rust core.
#[pyfunction]
fn core_version() -> &'static str {
    meshfed_gateway::VERSION
}

/// Checks a config document without starting anything; raises ConfigError.
#[pyfunction]
fn validate_config(py: Python<'_>, config: &[u8]) -> PyResult<()> {
    py.detach(|| meshfed_gateway::validate_config(config))
        .map_err(|e| ConfigError::new_err(e.to_string()))
}

/// A config document compiled once: checked, and applied later without
/// compiling it again (a 10,000-cluster document compiles in about 0.1 s).
/// Applying takes it: a second apply of the same object is refused.
#[pyclass(frozen, module = "meshfed._core")]
struct CompiledConfig {
    inner: Mutex<Option<meshfed_gateway::CompiledConfig>>,
}

impl CompiledConfig {
    /// The compiled config, once: a second start or apply of it is refused.
    fn take(&self) -> PyResult<meshfed_gateway::CompiledConfig> {
        self.inner
            .lock()
            .map_err(|_| GatewayError::new_err("a compiled config's lock was poisoned"))?
            .take()
            .ok_or_else(|| {
                GatewayError::new_err(
                    "this compiled config was applied already; compile the document again",
                )
            })
    }
}

/// Compiles a config document without starting anything; raises ConfigError.
#[pyfunction]
fn compile_config(py: Python<'_>, config: &[u8]) -> PyResult<CompiledConfig> {
    let compiled = py
        .detach(|| meshfed_gateway::CompiledConfig::from_json(config))
        .map_err(|e| ConfigError::new_err(e.to_string()))?;
    Ok(CompiledConfig {
        inner: Mutex::new(Some(compiled)),
    })
}

/// The JSON Schema of the gateway config document, derived from the Rust types.
#[pyfunction]
fn gateway_config_schema() -> String {
    meshfed_gateway::config_schema_json()
}

/// The JSON Schema of the gateway stats document, derived from the Rust types.
#[pyfunction]
fn gateway_stats_schema() -> String {
    meshfed_gateway::stats_schema_json()
}

/// Routes the data plane's log events into Python's `logging` (logger
/// `meshfed.gateway.data_plane`) and reads that logger's level again.
/// Runs at import and at every gateway start; call it after reconfiguring
/// logging while a gateway runs. Idempotent.
#[pyfunction]
fn configure_data_plane_logging(py: Python<'_>) -> PyResult<()> {
    logging::install(py)
}

/// A running east-west gateway on its own Rust runtime.
#[pyclass(frozen, module = "meshfed._core")]
struct Gateway {
    inner: meshfed_gateway::Gateway,
}

#[pymethods]
impl Gateway {
    /// Compiles `config`, binds every listener and starts serving.
    #[new]
    fn new(py: Python<'_>, config: &[u8]) -> PyResult<Self> {
        // The logger's level as it is now (`meshfed up` configures logging
        // after importing this module).
        logging::install(py)?;
        let inner = py
            .detach(|| meshfed_gateway::Gateway::start(config))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Swaps in a new config; on error the running config is untouched.
    fn apply(&self, py: Python<'_>, config: &[u8]) -> PyResult<()> {
        py.detach(|| self.inner.apply(config)).map_err(to_py)
    }

    /// Binds every listener of a config compiled by `compile_config`, which
    /// it takes, and starts serving: a config checked already is not
    /// compiled twice (at 10,000 services, a tenth of a second).
    #[staticmethod]
    fn start_compiled(py: Python<'_>, compiled: &CompiledConfig) -> PyResult<Self> {
        logging::install(py)?;
        let config = compiled.take()?;
        let inner = py
            .detach(|| meshfed_gateway::Gateway::start_compiled(config))
            .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Swaps in a config compiled by `compile_config`, which it takes.
    fn apply_compiled(&self, py: Python<'_>, compiled: &CompiledConfig) -> PyResult<()> {
        let config = compiled.take()?;
        py.detach(|| self.inner.apply_compiled(config))
            .map_err(to_py)
    }

    /// Applies a patch document to the running config, compiling only what
    /// it changes; on error the running config is untouched.
    fn apply_patch(&self, py: Python<'_>, patch: &[u8]) -> PyResult<()> {
        py.detach(|| self.inner.apply_patch(patch)).map_err(to_py)
    }

    /// The bound address ("ip:port") of each listener, by name.
    fn addresses(&self, py: Python<'_>) -> BTreeMap<String, String> {
        py.detach(|| {
            self.inner
                .addresses()
                .into_iter()
                .map(|(name, addr)| (name, addr.to_string()))
                .collect()
        })
    }

    /// Per-listener counters as JSON bytes.
    fn stats<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let json = py.detach(|| self.inner.stats_json());
        PyBytes::new(py, json.as_bytes())
    }

    /// Unhealthy endpoints ("ip:port") by cluster name; healthy clusters are left out.
    fn unhealthy_endpoints(&self) -> BTreeMap<String, Vec<String>> {
        self.inner
            .unhealthy_endpoints()
            .into_iter()
            .map(|(name, down)| (name, down.iter().map(ToString::to_string).collect()))
            .collect()
    }

    /// Stops all listeners and the runtime. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown());
    }
}

/// The Rust core of meshfed: the gateway data plane.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", meshfed_gateway::VERSION)?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("GatewayError", py.get_type::<GatewayError>())?;
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    m.add_function(wrap_pyfunction!(validate_config, m)?)?;
    m.add_function(wrap_pyfunction!(compile_config, m)?)?;
    m.add_function(wrap_pyfunction!(gateway_config_schema, m)?)?;
    m.add_function(wrap_pyfunction!(gateway_stats_schema, m)?)?;
    m.add_function(wrap_pyfunction!(configure_data_plane_logging, m)?)?;
    m.add_class::<Gateway>()?;
    m.add_class::<CompiledConfig>()?;
    logging::install(py)?;
    Ok(())
}
