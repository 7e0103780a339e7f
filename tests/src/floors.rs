//! Device and disk floors for the benchmark: what one signature costs when asked of the
//! device directly (cryptoki, tss-esapi; no tessera code in the loop) and what one
//! `fdatasync`ed append costs, measured in the same run as the daemon's figures.

use std::io::Write;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use crate::devices::{SoftHsm, Swtpm, SOFTHSM_MODULE, USER_PIN};

/// `n` single-thread latencies and the wall time they took.
pub struct Sample {
    pub lat: Vec<Duration>,
    pub wall: Duration,
}

fn sample(n: usize, mut one: impl FnMut()) -> Sample {
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        one();
        lat.push(t.elapsed());
    }
    Sample {
        lat,
        wall: t0.elapsed(),
    }
}

/// `C_Sign` (CKM_ECDSA, P-256 token key) through cryptoki, the handle found once.
pub fn pkcs11_sign(hsm: &SoftHsm, n: usize) -> Sample {
    std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
    let ctx = Pkcs11::new(SOFTHSM_MODULE).expect("load SoftHSM");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == "tessera")
        })
        .expect("token");
    let session = ctx.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("login");
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let (_, key) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(p256),
                Attribute::Verify(true),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
            ],
        )
        .expect("C_GenerateKeyPair");
    let digest = [7u8; 32];
    let s = sample(n, || {
        session
            .sign(&Mechanism::Ecdsa, key, &digest)
            .expect("C_Sign");
    });
    drop(session);
    ctx.finalize().ok();
    s
}

/// TPM2_Sign through tss-esapi: (key resident, load + sign + flush from the blobs,
/// ContextLoad + sign + flush from a saved context).
pub fn tpm_sign(tpm: &Swtpm, n: usize) -> (Sample, Sample, Sample) {
    use std::str::FromStr;
    use tesserad::keystore::tpm::{agent_key_template, primary_template};
    use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
    use tss_esapi::interface_types::{
        algorithm::HashingAlgorithm, resource_handles::Hierarchy, session_handles::AuthSession,
    };
    use tss_esapi::structures::{Digest, HashScheme, HashcheckTicket, SignatureScheme};
    use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
    use tss_esapi::{Context, TctiNameConf};

    let mut ctx =
        Context::new(TctiNameConf::from_str(&tpm.tcti()).expect("tcti")).expect("open TPM");
    ctx.set_sessions((Some(AuthSession::Password), None, None));
    let primary = ctx
        .create_primary(
            Hierarchy::Owner,
            primary_template().unwrap(),
            None,
            None,
            None,
            None,
        )
        .expect("primary")
        .key_handle;
    let created = ctx
        .create(
            primary,
            agent_key_template().unwrap(),
            None,
            None,
            None,
            None,
        )
        .expect("create");
    let ticket = || {
        HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .unwrap()
    };
    let scheme = SignatureScheme::EcDsa {
        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
    };
    let digest = Digest::try_from(vec![7u8; 32]).unwrap();
    let key = ctx
        .load(
            primary,
            created.out_private.clone(),
            created.out_public.clone(),
        )
        .expect("load");
    let resident = sample(n, || {
        ctx.sign(key, digest.clone(), scheme, ticket())
            .expect("sign");
    });
    let saved = ctx.context_save(key.into()).expect("ContextSave");
    ctx.flush_context(key.into()).expect("flush");
    let reload = sample(n, || {
        let k = ctx
            .load(
                primary,
                created.out_private.clone(),
                created.out_public.clone(),
            )
            .expect("load");
        ctx.sign(k, digest.clone(), scheme, ticket()).expect("sign");
        ctx.flush_context(k.into()).expect("flush");
    });
    let context = sample(n, || {
        let k = ctx.context_load(saved.clone()).expect("ContextLoad");
        let k = tss_esapi::handles::KeyHandle::from(k);
        ctx.sign(k, digest.clone(), scheme, ticket()).expect("sign");
        ctx.flush_context(k.into()).expect("flush");
    });
    ctx.flush_context(primary.into()).ok();
    (resident, reload, context)
}

/// One audit-sized line appended and `fdatasync`ed, in a file on the state directory's disk.
pub fn fdatasync_append(dir: &std::path::Path, n: usize) -> Sample {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("floor.log"))
        .expect("open");
    let line = [b'x'; 600];
    sample(n, || {
        f.write_all(&line).expect("write");
        f.write_all(b"\n").expect("write");
        f.sync_data().expect("fdatasync");
    })
}
