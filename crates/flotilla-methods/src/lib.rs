//! Federated-learning methods for flotilla, one module each (server half and client half
//! side by side), and the registry that builds them from a config.
#![warn(missing_docs)]

pub mod catalog;
mod common;
pub mod fedavg;
pub mod fedlrt;
pub mod fedmap;
pub mod fedtsa;
pub mod flextrain;
pub mod fll;

use flotilla_engine::{ClientHalf, EngineError, Experiment, ServerHalf};
use flotilla_models::Net;
use std::sync::Arc;

/// Names accepted in `[method] name = …`.
pub const METHODS: &[&str] = &[
    "fedavg",
    "fedprox",
    "fedmap",
    "flextrain",
    "fedsmall",
    "fedclass",
    "fedlrt",
    "fedlin",
    "fll",
    "fedssl",
    "fedtsa",
    "fedtsa-stage1",
    "feddf",
    "fedavg-smallest",
    "heterofl",
    "fedrolex",
];

/// The two halves of a method, as the engine drives them.
pub type Halves = (Box<dyn ServerHalf>, Arc<dyn ClientHalf>);

/// Builds both halves of the configured method, with the initial global model drawn from
/// the run seed.
pub fn build(exp: &Experiment) -> Result<Halves, EngineError> {
    let spec = exp.model_spec();
    let init = Net::init_params(&spec, exp.seed)?;
    match exp.method_name() {
        "fedavg" | "fedprox" => {
            let server = fedavg::FedAvg::from_config(exp, spec, init)?;
            Ok((Box::new(server), Arc::new(fedavg::FedAvgClient)))
        }
        "fedmap" => {
            let server = fedmap::FedMap::from_config(exp, spec, init)?;
            Ok((Box::new(server), Arc::new(fedmap::FedMapClient)))
        }
        "flextrain" | "fedsmall" | "fedclass" => {
            let server = flextrain::FlexTrain::from_config(exp, spec, init)?;
            Ok((Box::new(server), Arc::new(flextrain::FlexTrainClient)))
        }
        "fedlrt" | "fedlin" => {
            let server = fedlrt::FedLrt::from_config(exp, spec)?;
            Ok((Box::new(server), Arc::new(fedlrt::FedLrtClient)))
        }
        "fll" | "fedssl" => {
            let server = fll::Fll::from_config(exp, spec)?;
            Ok((Box::new(server), Arc::new(fll::FllClient)))
        }
        "fedtsa" | "fedtsa-stage1" | "feddf" | "fedavg-smallest" | "heterofl" | "fedrolex" => {
            let server = fedtsa::FedTsa::from_config(exp, spec)?;
            // A FedTSA task is FedAvg's at the cluster's width.
            Ok((Box::new(server), Arc::new(fedavg::FedAvgClient)))
        }
        other => Err(EngineError::Config(format!(
            "`method.name`: unknown method `{other}`; available: {} (`flotilla methods` lists them with their options)",
            METHODS.join(", ")
        ))),
    }
}
