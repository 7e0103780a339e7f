/*
 * The agent lifecycle of lifecycle.rs as a Promela model, checked with spin in scripts/test
 * (tests/scripts/model.sh): enrolment (E*), suspension and resumption (S*, R*), revocation
 * (V*), a token request (T*), and kill -9 between any two steps followed by the start-up
 * repair (`repair()`, C*). One agent; two admin calls and a token request run concurrently, so
 * every interleaving of them, with up to two crashes anywhere, is explored.
 *
 * Not modelled: the kill switch's early refusal (`Agents::killing`, checked at T0 and before
 * T2). It only turns a request away sooner and changes no state, so it cannot break an
 * invariant.
 *
 * Each step is one atomic action of the code, named in the code by a `model: <step>` comment.
 * Durable state (registry record, key state, the device) survives a crash; memory (the agent
 * set, the issuance gate, the admin lock, calls in progress) does not.
 *
 * Invariants:
 *  I1  a device key always has a record naming it (the record is written first);
 *  I2  after repair, a key is held only by a live agent or a revoked one whose destroy is due;
 *  I3  once the revoked record is durable, the agent is never active or suspended again;
 *  I4  no credential is handed out after the revoked record is durable;
 *  I5  when everything has run, a revoked agent's key is gone from the device.
 */

mtype = { NONE, PENDING, ACTIVE, SUSPENDED, REVOKED };

/* durable */
mtype rec = NONE;              /* the agent's registry record */
bool destroyed_mark = false;   /* key_state = destroyed in that record */
bool dev_key = false;          /* the key exists in the device */
/* memory */
mtype mem = NONE;              /* the in-memory agent set (what requests are matched against) */
byte readers = 0;              /* the issuance gate: readers and one writer */
bool writer = false;
bool admin = false;            /* the admin lock (one admin call at a time) */

/* observers */
bool revoked_durable = false;
bool delivered_after_revoke = false;

/* program counters: admin call 1 (enrol, then revoke), admin call 2 (suspend, then resume),
   the token requester (two requests) */
byte e = 0;
byte s = 0;
byte t = 0;
byte requests = 0;
byte crashes = 0;

#define E_DONE 14
#define S_DONE 12
#define T_DONE 9

#define live(x) ((x) == ACTIVE || (x) == SUSPENDED)

inline repair() {
    /* C1 pending records: the interrupted enrolment's key destroyed, the record deleted */
    if
    :: rec == PENDING -> dev_key = false; rec = NONE
    :: else -> skip
    fi;
    /* C2 revoked with the key not yet destroyed: destroy it, mark it */
#ifndef BROKEN_REPAIR
    if
    :: rec == REVOKED && !destroyed_mark -> dev_key = false; destroyed_mark = true
    :: else -> skip
    fi;
#endif
    /* C3 memory loaded from the registry */
    mem = rec;
    assert(!dev_key || live(rec) || (rec == REVOKED && !destroyed_mark))  /* I2 */
}

active proctype lifecycle() {
    do
    /* admin call 1: enrol (E0-E5), then revoke (E6-E13) */
    :: atomic { e == 0 && !admin -> admin = true; e = 1 }                  /* E0 admin lock */
    :: atomic { e == 1 -> rec = PENDING; e = 2 }                           /* E1 insert_pending */
    :: atomic { e == 2 -> dev_key = true; e = 3 }                          /* E2 keystore.create */
    :: atomic { e == 3 -> rec = ACTIVE; e = 4 }                            /* E3 activate */
    :: atomic { e == 4 -> mem = rec; e = 5 }                               /* E4 apply */
    :: atomic { e == 5 -> admin = false; e = 6 }                           /* E5 audit, unlock */
    :: atomic { e == 6 && !admin -> admin = true; e = 7 }                  /* V0 admin lock */
    :: atomic { e == 7 -> if :: live(rec) -> e = 8 :: else -> e = 13 fi }  /* V1 get_live */
#ifndef BROKEN_GATE
    :: atomic { e == 8 && !writer && readers == 0 -> writer = true; e = 9 }  /* V2 gate write */
#else
    /* the mutation the check must catch: revocation without the issuance gate */
    :: atomic { e == 8 -> e = 9 }
#endif
    :: atomic { e == 9 -> rec = REVOKED; revoked_durable = true; e = 10 }  /* V3 mark_all_revoked */
    :: atomic { e == 10 -> mem = REVOKED; writer = false; e = 11 }         /* V4 apply, gate released (records after) */
    :: atomic { e == 11 -> dev_key = false; e = 12 }                       /* V5 destroy key */
    :: atomic { e == 12 -> destroyed_mark = true; e = 13 }                 /* V6 mark destroyed */
    :: atomic { e == 13 -> admin = false; e = E_DONE }                     /* V7 unlock */

    /* admin call 2: suspend (S0-S5), then resume (R6-R11) */
    :: atomic { s == 0 && !admin -> admin = true; s = 1 }                  /* S0 admin lock */
    :: atomic { s == 1 -> if :: rec == ACTIVE -> s = 2 :: else -> s = 5 fi }  /* S1 live_by_name */
    :: atomic { s == 2 && !writer && readers == 0 -> writer = true; s = 3 }  /* S2 gate write */
    :: atomic { s == 3 -> rec = SUSPENDED; s = 4 }                         /* S3 set_status */
    :: atomic { s == 4 -> mem = SUSPENDED; writer = false; s = 5 }         /* S4 apply, gate */
    :: atomic { s == 5 -> admin = false; s = 6 }                           /* S5 audit, unlock */
    :: atomic { s == 6 && !admin -> admin = true; s = 7 }                  /* R6 admin lock */
    :: atomic { s == 7 -> if :: rec == SUSPENDED -> s = 8 :: else -> s = 11 fi }  /* R7 live_by_name */
    :: atomic { s == 8 && !writer && readers == 0 -> writer = true; s = 9 }  /* R8 gate write */
    :: atomic { s == 9 -> rec = ACTIVE; s = 10 }                           /* R9 set_status */
    :: atomic { s == 10 -> mem = ACTIVE; writer = false; s = 11 }          /* R10 apply, gate */
    :: atomic { s == 11 -> admin = false; s = S_DONE }                     /* R11 unlock */

    /* a token request (twice): matched in memory, signed in the device, released under the
       gate's read side after the liveness check and the durable audit record */
    :: atomic { t == 0 -> if :: mem == ACTIVE -> t = 1 :: else -> t = 5 fi }  /* T0 identify */
    :: atomic { t == 1 -> if :: dev_key -> t = 2 :: else -> t = 5 fi }    /* T1 sign */
    :: atomic { t == 2 && !writer -> readers++; t = 3 }                    /* T2 gate read */
    :: atomic { t == 3 -> if :: mem == ACTIVE -> t = 4 :: else -> t = 6 fi }  /* T3 may_release */
    :: atomic { t == 4 -> delivered_after_revoke = delivered_after_revoke || revoked_durable;
                          t = 6 }                                          /* T4 audit, release */
    :: atomic { t == 6 -> readers--; t = 5 }                               /* T5 gate unlock */
    :: atomic { t == 5 -> requests++;
                          if :: requests < 2 -> t = 0 :: else -> t = T_DONE fi }

    /* kill -9 anywhere, then a start: calls in progress are lost (their callers got an
       error), memory is gone, repair runs */
    :: atomic { crashes < 2 ->
                crashes++;
                admin = false; writer = false; readers = 0;
                if :: e < 6 -> e = 6 :: else -> e = E_DONE fi;
                s = S_DONE;
                if :: requests < 2 -> t = 0 :: else -> t = T_DONE fi;
                repair() }

    :: (e == E_DONE && s == S_DONE && t == T_DONE) -> break
    od;
    assert(!revoked_durable || !dev_key)                                   /* I5 */
}

/* I1, I3, I4 hold in every state */
active proctype invariants() {
end:
    atomic {
        !((!dev_key || rec != NONE)
          && (!revoked_durable || rec == REVOKED)
          && !delivered_after_revoke) -> assert(false)
    }
}
