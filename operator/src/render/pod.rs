//! Pieces every pod the operator runs shares: a locked-down security context, default
//! resources, Secret-backed environment variables and volumes, and how a pod reaches
//! its pool's NATS (env for secrets, mounted files for credentials and TLS).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, EnvVar, EnvVarSource, PodSecurityContext, ResourceRequirements, SeccompProfile,
    SecretKeySelector as KubeSecretKeySelector, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nexo_api::crd::PoolNats;
use nexo_api::spec::SecretKeySelector;

/// Unprivileged user every container runs as (the distroless `nonroot` user).
pub const RUN_AS_USER: i64 = 65532;

pub const NATS_CREDS_DIR: &str = "/var/run/nexo/nats/creds";
pub const NATS_TLS_DIR: &str = "/var/run/nexo/nats/tls";

/// Environment variables a pod fills from the pool's NATS Secrets.
pub const ENV_NATS_PASSWORD: &str = "NEXO_NATS_PASSWORD";
pub const ENV_NATS_TOKEN: &str = "NEXO_NATS_TOKEN";
pub const ENV_NATS_NKEY_SEED: &str = "NEXO_NATS_NKEY_SEED";

/// Non-root, no privilege escalation, no capabilities, read-only root file system.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// The pod-level half: fixed non-root user and group, the runtime's seccomp profile.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Requests 100m / 128Mi, limit 512Mi memory.
pub fn default_resources() -> ResourceRequirements {
    let quantities = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
            .collect::<BTreeMap<_, _>>()
    };
    ResourceRequirements {
        requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
        limits: Some(quantities(&[("memory", "512Mi")])),
        ..ResourceRequirements::default()
    }
}

pub fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

pub fn secret_env(name: &str, selector: &SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(KubeSecretKeySelector {
                name: selector.name.clone(),
                key: selector.key.clone(),
                ..KubeSecretKeySelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// What a pod needs to reach a pool's NATS: Secret-backed variables for password,
/// token and NKey seed, and mounted Secrets for a credentials file and TLS material.
#[derive(Debug, Clone, Default)]
pub struct NatsAccess {
    pub env: Vec<EnvVar>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

impl NatsAccess {
    pub fn for_pool(nats: &PoolNats) -> Self {
        let mut access = Self::default();
        for (var, selector) in [
            (ENV_NATS_PASSWORD, nats.user.as_ref().map(|u| &u.password)),
            (ENV_NATS_TOKEN, nats.token.as_ref()),
            (ENV_NATS_NKEY_SEED, nats.nkey_seed.as_ref()),
        ] {
            if let Some(selector) = selector {
                access.env.push(secret_env(var, selector));
            }
        }
        if let Some(creds) = &nats.credentials {
            access
                .volumes
                .push(secret_volume("nats-creds", &creds.name));
            access
                .mounts
                .push(mount("nats-creds", NATS_CREDS_DIR, true));
        }
        if let Some(tls) = &nats.tls {
            access
                .volumes
                .push(secret_volume("nats-tls", &tls.secret_name));
            access.mounts.push(mount("nats-tls", NATS_TLS_DIR, true));
        }
        access
    }
}
