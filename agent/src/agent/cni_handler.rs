//! The agent's answers to the CNI plugin (`--cni-socket`): ADD enrolls the
//! pod on demand, CHECK says whether it is captured as it should be, DEL
//! leaves removal to the pod source (the pod leaving the API or the file).

use std::sync::Arc;

use super::{
    on_demand::{enroll_now, EnrollOutcome, EnrollRequest},
    AgentState, PodState,
};
use crate::{
    cni::protocol::{AddOutcome, AddRequest, CheckRequest, DelRequest},
    pods::Lookup,
    policy::{pod_policy, Enrollment},
};

pub struct CniHandler {
    pub state: Arc<AgentState>,
}

impl crate::cni::server::Handler for CniHandler {
    async fn add(&self, req: AddRequest) -> Result<AddOutcome, String> {
        let netns = crate::netns::runtime_netns_path(&req.netns, std::path::Path::new("/proc"));
        let request = EnrollRequest { namespace: req.namespace, name: req.name, uid: req.uid, netns };
        match enroll_now(&self.state, request).await {
            Ok(EnrollOutcome::Captured) => Ok(AddOutcome::Captured),
            Ok(EnrollOutcome::NotEnrolled { reason }) => Ok(AddOutcome::NotEnrolled { reason }),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn del(&self, req: DelRequest) -> Result<(), String> {
        // A sandbox torn down may come back (restart); the pod's capture goes
        // when the source drops the pod, never on a runtime's word alone.
        tracing::debug!(pod = %format!("{}/{}", req.namespace, req.name), "CNI DEL: capture follows the pod source");
        Ok(())
    }

    fn status(&self) -> Result<(), String> {
        super::on_demand::ready(&self.state).map_err(|e| e.to_string())
    }

    async fn check(&self, req: CheckRequest) -> Result<AddOutcome, String> {
        let pod = format!("{}/{}", req.namespace, req.name);
        if let Some(entry) = self.state.pods.lock().expect("lock").get(&req.uid) {
            return match &entry.state {
                PodState::Captured(_) => Ok(AddOutcome::Captured),
                PodState::Failed { error, .. } => Err(format!("pod {pod} should be captured but is not: {error}")),
                PodState::NotEnrolled => Ok(AddOutcome::NotEnrolled {
                    reason: format!("pod {pod} is not enrolled ({:?})", entry.policy.enrollment),
                }),
            };
        }
        match self.state.source.lookup(&req.namespace, &req.name, &req.uid).await {
            Ok(Lookup::Found(info)) if pod_policy(&info).enrollment != Enrollment::NotRequested => {
                Err(format!("pod {pod} asks for the mesh but is not captured on this node"))
            }
            Ok(Lookup::Found(_)) => {
                Ok(AddOutcome::NotEnrolled { reason: format!("pod {pod} does not ask for the mesh") })
            }
            Ok(Lookup::Ignored { reason }) => Ok(AddOutcome::NotEnrolled { reason }),
            Ok(Lookup::Absent) => Err(format!("pod {pod} is not in the {}", self.state.source.describe())),
            Err(e) => Err(format!("pod {pod}: {e}")),
        }
    }
}
