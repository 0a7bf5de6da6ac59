//! gRPC health, set for a service and for the server as a whole at once
//! (checkers ask for either).

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Reports `service` and the server ("") as serving or not.
pub async fn set(reporter: &HealthReporter, service: &str, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status(service, status).await;
    reporter.set_service_status("", status).await;
}
