"""Keys of the records exchanged between the ServerApp and ClientApps."""

ARRAYS = "arrays"  # ArrayRecord of shared parameters (server -> silo, silo -> server)
CONFIG = "config"  # ConfigRecord of per-round instructions (server -> silo)
METRICS = "metrics"  # MetricRecord of training stats or evaluation sums (silo -> server)

PRIVACY = "privacy"  # ConfigRecord of a silo's local-DP summary (silo -> server)
LEDGER = "ledger"  # ConfigRecord of a silo's new privacy-ledger lines (silo -> server)
LEDGER_COUNTS = "ledger-counts"  # train config: ledger lines the server holds, per partition id

NUM_EXAMPLES = "num-examples"  # FedAvg weight: training positives in the silo
SERVER_ROUND = "server-round"  # set by Flower's strategies in every instruction
RUN_UID = "run-uid"  # train/evaluate config: identifies the run (silos key durable state by it)
RUN_DIR = "run-dir"  # train/evaluate config: the server's run directory (default home of silos' state)
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_CPU_SECONDS = "train-cpu-seconds"  # train metrics: the silo process's CPU time of local training
PARTITION_ID = "partition-id"  # train metrics: the silo the reply claims to be
EVAL_WITHHELD = "evaluation-withheld"  # evaluate metrics: 1 = the silo kept its sums (privacy.release)
EVAL_NOISY = "evaluation-noisy"  # evaluate metrics: 1 = the sums carry accounted Gaussian noise
EVAL_WITHHELD_SILOS = "withheld-silos"  # aggregated evaluation: silos that withheld their sums
TRAIN_SILOS = "silos"  # aggregated metrics: silos whose replies were combined
MODEL_KEPT = "model-kept"  # round train metrics: 1 = no aggregate replaced the model (no silo, or it was rejected)
EVALUATE_CONFIG = "evaluate-config"  # train message (eval.fused): also evaluate the received model first
EVALUATION_PREFIX = "evaluation."  # fused train reply: the evaluation reply's records under this prefix

# Keys of the node's persistent state (context.state); never sent.
STATE_USER_PARAMS = "fedrec.user-params"
STATE_SILO_DATA = "fedrec.silo-data"
STATE_PRIVACY = "fedrec.privacy"
STATE_LEDGER = "fedrec.ledger"
STATE_PERSONALIZED = "fedrec.personalized"  # the silo's personalized model (personalize.enabled)

# Fields of the LEDGER record.
LEDGER_PARTITION = "partition-id"
LEDGER_FIRST_SEQ = "first-seq"  # seq of the first line sent
LEDGER_LINES = "lines"
LEDGER_HEAD = "head"  # hash of the silo's last line
