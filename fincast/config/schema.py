"""The config schema: one frozen dataclass per section, each field with its default, one-line help and checks
(ge, gt, le, lt, allowed, ...), and the helpers that read it (field order, how a type and a value are shown)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


def _opt(default: Any = dataclasses.MISSING, help: str = "", **checks: Any) -> Any:
    """A config field: default, one-line help, and optional checks (ge, gt, le, lt, allowed)."""
    meta = {"help": help, **checks}
    if isinstance(default, tuple | list):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["yfinance", "csv", "synthetic"] = _opt(
        "yfinance", "where prices come from: yfinance (cached in cache_dir), csv (one file per ticker in path), synthetic")
    tickers: tuple[str, ...] = _opt(("SPY",), "Yahoo tickers; one model is trained on all of them", min_len=1)
    interval: Literal["1d"] = _opt("1d", "bar interval (daily only for now)")
    start: dt.date | None = _opt(dt.date(2005, 1, 1), "first date used (inclusive); null = all history")
    end: dt.date | None = _opt(None, "last date used (inclusive); null = up to the latest bar")
    path: str | None = _opt(None, "csv source: directory with one <TICKER>.csv per ticker")
    cache_dir: str = _opt("data", "yfinance source: directory of the parquet cache")
    price: Literal["adj_close", "close"] = _opt(
        "adj_close", "price used for returns: adj_close (splits and dividends) or close")
    timeout_s: float = _opt(20.0, "yfinance source: bound on the total wait for Yahoo, in seconds", gt=0, le=600)
    retries: int = _opt(3, "yfinance source: attempts per ticker for transient and rate-limit errors", ge=1, le=10)
    refresh_after_hours: float = _opt(
        12.0, "yfinance source: cached data younger than this is used without any network call", ge=0)
    max_fill_gap: int = _opt(
        3, "repair: runs of at most this many missing days are forward-filled (with a warning); longer runs are errors", ge=0, le=30)
    max_gap_days: int = _opt(
        14, "plausibility: warn on a gap of more than this many calendar days between bars", ge=1, le=100000)
    max_move: float = _opt(
        25.0, "plausibility: warn on a one-bar log move of close or adj_close beyond this many robust standard "
              "deviations (1.4826 x MAD) of the series' moves", gt=0)
    strict: bool = _opt(
        False, "plausibility warnings (gaps, moves, open/close outside [low, high], weekend or future dates, option "
               "quotes outside no-arbitrage bounds) are errors instead")
    date_format: str | None = _opt(
        None, "csv source: strptime format of the Date column (e.g. %d/%m/%Y); null = YYYY-MM-DD, or numeric "
              "day/month dates in the one order the file's own dates allow (refused when none has a day above 12)")
    seed: int = _opt(0, "synthetic source: random seed", ge=0)
    calendar: Literal["auto", "equity", "crypto"] = _opt(
        "auto", "synthetic source: trading calendar; auto = crypto for *-USD tickers, equity otherwise")


@dataclass(frozen=True)
class FeaturesConfig:
    lookback: int = _opt(30, "days of features in each input window", ge=1, le=2000)
    horizon: int = _opt(1, "forecast horizon h: the target is the log return over the next h bars", ge=1, le=250)
    vol_windows: tuple[int, ...] = _opt((5, 21), "realized-volatility windows in bars", min_len=0, item_ge=2)
    volume: bool = _opt(True, "include the volume feature (log volume relative to its 21-bar mean)")
    val_start: dt.date | None = _opt(None, "first target date of the validation split; null = from val_frac")
    test_start: dt.date | None = _opt(None, "first target date of the test split; null = from test_frac")
    val_frac: float = _opt(0.15, "share of sample dates in validation (when val_start is null)", gt=0, lt=1)
    test_frac: float = _opt(0.15, "share of sample dates in test (when test_start is null)", gt=0, lt=1)
    scale_target: bool = _opt(True, "train on targets divided by each ticker's training std (metrics stay in log-return units)")


@dataclass(frozen=True)
class ModelConfig:
    type: Literal["lstm"] = _opt("lstm", "model family")
    hidden_size: int = _opt(32, "LSTM hidden units", ge=1, le=4096)
    num_layers: int = _opt(1, "stacked LSTM layers", ge=1, le=16)
    dropout: float = _opt(0.0, "dropout between LSTM layers and before the head", ge=0, lt=1)
    layer_norm: bool = _opt(False, "LayerNorm on the last hidden state before the head")
    ridge_alpha: float = _opt(1.0, "L2 penalty of the ridge-regression baseline", ge=0)
    head_hidden: int = _opt(64, "options task: units of each hidden layer of the MLP head that joins the LSTM state "
                                "with the contract features", ge=1, le=4096)
    head_layers: int = _opt(2, "options task: hidden layers of that MLP head", ge=1, le=16)
    bounded_output: bool = _opt(
        True, "options task: predict the no-arbitrage lower bound (price target) or 0 (iv target) plus a softplus, "
              "so no price falls below the bound; false = the head's plain linear output")


@dataclass(frozen=True)
class TrainConfig:
    device: Literal["auto", "cpu", "cuda", "mps"] = _opt("auto", "auto = cuda > mps > cpu")
    seed: int = _opt(0, "seed for weights, shuffling and dropout", ge=0)
    epochs: int = _opt(30, "maximum epochs", ge=1, le=100000)
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (null = no limit)", ge=1)
    batch_size: int = _opt(64, "samples per step", ge=1, le=1_000_000)
    lr: float = _opt(1e-3, "peak learning rate", gt=0, le=10)
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = _opt("adamw", "optimizer")
    weight_decay: float = _opt(0.0, "weight decay", ge=0)
    momentum: float = _opt(0.9, "momentum (sgd, rmsprop)", ge=0, lt=1)
    schedule: Literal["none", "cosine", "step"] = _opt("none", "learning-rate schedule after warmup")
    warmup_steps: int = _opt(0, "linear warmup from 0 to lr over this many steps", ge=0)
    step_size: int = _opt(10, "step schedule: epochs between decays", ge=1)
    gamma: float = _opt(0.5, "step schedule: decay factor", gt=0, le=1)
    min_lr_ratio: float = _opt(0.0, "cosine schedule: final lr as a share of lr", ge=0, le=1)
    patience: int | None = _opt(10, "early stopping: epochs without val-loss improvement (null = off)", ge=1)
    min_delta: float = _opt(0.0, "early stopping: improvement smaller than this does not count", ge=0)
    threads: int | None = _opt(
        None, "CPU threads for torch; null = all cores, less one for the metric writer process (a backtest: 1, the "
              "fastest for its small LSTMs)", ge=1, le=1024)
    checkpoint: bool = _opt(
        True, "save a checkpoint at each epoch end to checkpoint_dir/<run id>.pt (for `fincast resume`)")
    checkpoint_every: int | None = _opt(None, "also save a checkpoint every this many steps (null = epoch ends only)", ge=1)
    checkpoint_dir: str = _opt("checkpoints", "directory of checkpoints")
    precision: Literal["fp32", "bf16", "fp16"] = _opt(
        "fp32", "fp32, or CUDA autocast: bf16, or fp16 with a GradScaler (gradients unscaled before clipping)")
    cuda_graphs: bool = _opt(
        True, "on CUDA, capture the training step as a CUDA graph and replay it (one launch per step; falls back to "
              "eager steps, with the reason logged, if capture fails); false = eager steps")


@dataclass(frozen=True)
class _Scheduled:
    """Threshold schedule shared by value, norm and agc: threshold(t) = base * factor(t), where factor goes
    from ``schedule_start`` at step 0 to 1 at ``schedule_steps`` (then stays 1)."""
    schedule: Literal["constant", "linear", "cosine"] = _opt(
        "constant", "threshold schedule: constant, linear or cosine from schedule_start x the threshold to the threshold")
    schedule_start: float = _opt(
        10.0, "schedule: threshold multiplier at step 0 (> 1 = loose early, < 1 = tight early)", gt=0, le=1e6)
    schedule_steps: int = _opt(1000, "schedule: steps over which the multiplier reaches 1", ge=1)


@dataclass(frozen=True)
class ValueClip(_Scheduled):
    value: float = _opt(1.0, "clamp every gradient element to [-value, value]", gt=0)


@dataclass(frozen=True)
class NormClip(_Scheduled):
    max_norm: float = _opt(1.0, "threshold on the norm (of all gradients, of each layer or of each tensor: scope)", gt=0)
    norm_type: float = _opt(2.0, "p of the p-norm: any p >= 1, or inf", ge=1)
    scope: Literal["global", "per_layer", "per_param"] = _opt(
        "global", "global: one norm over all parameters (torch clip_grad_norm_); per_layer: one per layer; "
                  "per_param: one per tensor (Keras clipnorm)")


@dataclass(frozen=True)
class AutoClipConfig:
    percentile: float = _opt(10.0, "threshold = this percentile of the history of global L2 norms", ge=0, le=100)
    window: int = _opt(10000, "history length in steps: all steps so far, up to this many", ge=1, le=1_000_000)


@dataclass(frozen=True)
class AGCConfig(_Scheduled):
    clip_factor: float = _opt(0.01, "clip a unit when ||G_i|| > clip_factor * max(||W_i||, eps)", gt=0)
    eps: float = _opt(1e-3, "floor on the weight norm of a unit (so zero-initialised units can move)", gt=0)
    skip_output: bool = _opt(True, "leave the output layer (the model's head) unclipped, as the paper recommends")


@dataclass(frozen=True)
class ZClipConfig:
    alpha: float = _opt(0.97, "EMA factor of the norm's mean and variance", gt=0, lt=1)
    z_thresh: float = _opt(2.5, "z-score above which a step is a spike and is clipped", gt=0)
    warmup: int = _opt(25, "steps whose norms initialise the mean and variance (no clipping meanwhile)", ge=1)
    rule: Literal["reciprocal", "mean"] = _opt(
        "reciprocal", "spike threshold: reciprocal = mean + z_thresh^2 * std / z (the paper's rule); mean = the EMA mean")
    max_norm: float | None = _opt(None, "optional absolute cap on the global L2 norm, also during warmup", gt=0)
    eps: float = _opt(1e-6, "added to the std in the z-score", gt=0)


CLIP_METHODS = ("none", "value", "norm", "autoclip", "agc", "zclip")


@dataclass(frozen=True)
class ClipConfig:
    """``method`` picks the clipper; its settings are in the section of the same name. Sections of other
    methods may stay in a spec (a study can switch methods) and are ignored."""
    method: Literal["none", "value", "norm", "autoclip", "agc", "zclip"] = _opt(
        "norm", "none, value, norm, autoclip, agc or zclip; settings in clip.<method>.*")
    value: ValueClip = field(default_factory=ValueClip)
    norm: NormClip = field(default_factory=NormClip)
    autoclip: AutoClipConfig = field(default_factory=AutoClipConfig)
    agc: AGCConfig = field(default_factory=AGCConfig)
    zclip: ZClipConfig = field(default_factory=ZClipConfig)


def short_float(x: float) -> str:
    """1e-3 -> '1e-3', 0.01 -> '0.01', 3e-4 -> '3e-4'."""
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
        mant, exp = f"{x:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{x:g}"


def clip_section(cfg: ClipConfig) -> dict:
    """What a clip config computes with: its method and that method's section (plain data)."""
    d = to_dict(cfg)
    return {"method": d["method"], **({} if d["method"] == "none" else {d["method"]: d[d["method"]]})}


@dataclass(frozen=True)
class MonitorConfig:
    every: int | None = _opt(
        50, "log per-layer gradient norms (grad/layer/<name>) and update/weight ratios (update/ratio/<name>) "
            "every this many steps; null = off", ge=1)
    spike_factor: float = _opt(5.0, "a step is a gradient spike when its norm > spike_factor x the running median", gt=1)
    spike_window: int = _opt(100, "steps in the running median of the spike detector", ge=2, le=100000)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = _opt(None, "MLflow tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")
    experiment: str | None = _opt(None, "MLflow experiment; null = the pipeline name")
    artifact_dir: str = _opt("mlartifacts", "artifact folder for new experiments on a local SQLite store")
    run_name: str | None = _opt(None, "MLflow run name; null = e.g. lstm-SPY-norm1.0-lr1e-3-s0")
    log_every: int = _opt(200, "per-step metrics are sent to MLflow in batches of this many steps", ge=1, le=10000)
    metric_every: int = _opt(
        10, "MLflow gets the per-step metrics of every this many steps (and of each epoch's last step); the run's "
            "series file (series.parquet) keeps every step", ge=1, le=100000)
    metrics_writer: Literal["process", "inline"] = _opt(
        "process", "process: a writer process stores metrics while training goes on; inline: the trainer does")
    log_model: bool = _opt(True, "log the trained model with mlflow.pytorch (signature and input example)")
    model_format: Literal["pickle", "pt2"] = _opt(
        "pickle", "pickle: the module pickled with fincast's code beside it (~0.1 s; loads on the CPU or a GPU); "
                  "pt2: a torch.export graph, no pickle (1-4 s; loads on the CPU only)")


@dataclass(frozen=True)
class BacktestConfig:
    """Walk-forward backtest (``fincast backtest``): folds, the models compared, and the trading rule."""
    start: dt.date | None = _opt(
        None, "first cutoff: fold 1 trains on targets known by this date and forecasts from it on; null = halfway "
              "through the history")
    end: dt.date | None = _opt(None, "last target date forecast; null = the end of the data")
    window: int | Literal["expanding"] = _opt(
        "expanding", "training data of each fold: expanding (everything up to the cutoff) or a rolling length in "
                     "bars (trading days of the data's calendar), e.g. 756", ge=2)
    refit_every: int = _opt(
        21, "bars between cutoffs: each fold forecasts from the refit_every origins after its cutoff", ge=1, le=10000)
    warm_start: bool = _opt(
        False, "start each fold's LSTM from the previous fold's weights (which only saw earlier data)")
    warm_epochs: int | None = _opt(
        None, "with warm_start: maximum epochs of every fold after the first; null = train.epochs", ge=1, le=100000)
    refit_full: bool = _opt(
        True, "after early stopping on the fold's inner validation split, retrain the LSTM on all the fold's training "
              "data (validation included) for the best epoch count, so it learns from data up to the cutoff; false = "
              "keep the early-stopped model (about half the training time)")
    stack_folds: int | Literal["auto"] = _opt(
        "auto", "folds whose LSTMs train together as one stack (the run axis: every fold its own samples, each run "
                "as it would alone); auto = every fold on CUDA, 32 on a CPU; 1 = one fold at a time. With "
                "warm_start, one fold at a time (each starts from the last)", ge=1)
    workers: int | None = _opt(
        None, "processes training stacks of folds at once; null = one per GPU on CUDA, else one per core (their "
              "torch threads: train.threads, else the cores shared out). Folds one at a time train in the backtest's "
              "own process", ge=1, le=1024)
    clips: tuple[ClipConfig, ...] | None = _opt(
        None, "LSTMs compared, one per clip config: a method name or a clip mapping, each over the spec's clip "
              "section; null = unclipped and the spec's clip", entries=ClipConfig)
    seeds: int = _opt(
        3, "training seeds of every LSTM (train.seed, train.seed + 1, ...): each clip config is trained once per "
           "seed and the report gives the median and range across seeds (one seed's trading numbers can be luck)",
        ge=1, le=100)
    resume: bool = _opt(
        True, "keep each finished fold in train.checkpoint_dir/backtest/ until the backtest ends, so that a killed "
              "backtest run again (same config and data) refits only the folds it had not finished")
    ridge_tune: bool = _opt(
        True, "choose ridge's penalty per fold (0.1 .. 1e5) on the fold's inner validation split; false = "
              "model.ridge_alpha")
    position: Literal["sign", "long_flat", "vol_target"] = _opt(
        "sign", "position rule: sign (long/short one unit), long_flat (long when the forecast is positive), "
                "vol_target (forecast strength x the leverage that targets vol_target)")
    vol_target: float = _opt(0.15, "vol_target rule: annualised volatility aimed at", gt=0, le=5)
    vol_window: int = _opt(21, "vol_target rule: bars of realised volatility (up to the day before)", ge=2, le=1000)
    max_position: float = _opt(1.0, "cap on |position| in units of capital (1 = no leverage)", gt=0, le=100)
    cost_bps: float = _opt(
        5.0, "transaction cost in basis points per unit of turnover (|position change|): spread, commission and "
             "slippage of a liquid ETF; raise it for crypto or single stocks", ge=0, le=10000)
    borrow_bps: float = _opt(
        50.0, "cost of holding a short position, basis points a year on its size (stock borrow and financing; "
              "general collateral ETFs ~25-50)", ge=0, le=100000)
    bootstrap: int = _opt(
        2000, "stationary-bootstrap resamples of the daily returns behind the trading intervals and the reality "
              "check", ge=100, le=100000)
    block_days: float = _opt(
        20.0, "stationary bootstrap: mean block length in bars (keeps volatility clustering within blocks)", ge=1,
        le=1000)
    sharpe_window: int = _opt(126, "bars in the report's rolling Sharpe ratio", ge=10, le=5000)


@dataclass(frozen=True)
class ChainColumns:
    """Column names of an end-of-day option-chain file; null = recognised by its common names (see
    ``fincast.data.options.ALIASES``). In the wide layout (calls and puts side by side) a name is the column's
    stem: bid means bid.c / bid.p, bid_c / bid_p, call_bid / put_bid."""
    quote_date: str | None = _opt(None, "quote (trade) date of the row, e.g. quotedate")
    expiry: str | None = _opt(None, "expiration date, e.g. expiration")
    strike: str | None = _opt(None, "strike price")
    type: str | None = _opt(None, "call or put (call/put, C/P), long layout only")
    bid: str | None = _opt(None, "bid price")
    ask: str | None = _opt(None, "ask price")
    last: str | None = _opt(None, "last trade price")
    volume: str | None = _opt(None, "contracts traded on the quote date")
    open_interest: str | None = _opt(None, "open interest")
    implied_vol: str | None = _opt(None, "vendor implied volatility (decimal, or percent: values > 3 are read as %)")
    underlying_price: str | None = _opt(None, "underlying's price at the quote; null and absent = its close")
    underlying: str | None = _opt(None, "underlying symbol or option root (filtered by options.symbol)")
    last_trade_date: str | None = _opt(None, "date of the last trade (stale-quote check)")
    days_to_expiry: str | None = _opt(None, "days to expiration, used when the file has no expiry column")


@dataclass(frozen=True)
class HestonConfig:
    """The synthetic option market (options.source = synthetic): an underlying under Heston stochastic
    volatility, simulated daily, and a chain per day priced by the Heston formula itself."""
    days: int = _opt(1500, "trading days simulated (252 a year)", ge=100, le=100000)
    s0: float = _opt(100.0, "initial price", gt=0)
    kappa: float = _opt(3.0, "mean-reversion speed of the variance", gt=0, le=100)
    theta: float = _opt(0.04, "long-run variance (0.04 = 20% volatility)", gt=0, le=4)
    xi: float = _opt(0.6, "volatility of variance", gt=0, le=10)
    rho: float = _opt(-0.7, "correlation of price and variance shocks (negative: the equity skew)", ge=-1, le=1)
    v0: float | None = _opt(None, "initial variance; null = theta", gt=0, le=4)
    rate: float = _opt(0.02, "risk-free rate per annum, continuously compounded", ge=-0.1, le=1)
    substeps: int = _opt(8, "simulation steps per day (full-truncation Euler)", ge=1, le=1000)
    maturities: tuple[int, ...] = _opt(
        (5, 10, 21, 42, 63, 126, 252), "expiries listed each day, in trading days", min_len=1, item_ge=1)
    moneyness: tuple[float, ...] = _opt(
        (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0),
        "strikes listed each day: K = S exp(m sqrt(theta tau)) for each m (standard deviations)", min_len=1)
    contracts_per_day: int | None = _opt(
        40, "a random sample of this many contracts of the day's grid (maturities x strikes x call/put); "
            "null = all", ge=1)
    seed: int = _opt(0, "random seed of the path and the contract sample", ge=0)


@dataclass(frozen=True)
class OptionsConfig:
    """The options-pricing task (``task: options``): where chains come from, how quotes are cleaned, the rate,
    the target and the evaluation buckets. The underlying's history comes from the data section."""
    source: Literal["csv", "store", "synthetic"] = _opt(
        "synthetic", "csv: end-of-day chain files (options.path); store: snapshots collected by `fincast data` "
                     "from yfinance (options.store_dir); synthetic: a Heston market (options.heston.*)")
    path: str | None = _opt(None, "csv source: a chain file, or a directory whose *.csv files are all read")
    layout: Literal["auto", "long", "wide"] = _opt(
        "auto", "csv source: long (one row per contract, a call/put column) or wide (one row per strike, call and "
                "put columns side by side); auto = wide when no call/put column is found")
    columns: ChainColumns = field(default_factory=ChainColumns)
    symbol: str | None = _opt(
        None, "keep rows whose underlying/root column equals this (e.g. SPXW); null = all rows (one underlying)")
    store_dir: str = _opt("data/options", "store source: directory of the dated snapshot store")
    price: Literal["mid", "last"] = _opt("mid", "market price of a contract: mid = (bid + ask) / 2, or last")
    stale_days: int = _opt(
        5, "a quote is stale when its last trade is more than this many days before the quote date (files with a "
           "last-trade-date column), or when price = last and nothing traded that day", ge=0, le=3650)
    min_days: int = _opt(1, "drop contracts with fewer calendar days to expiry", ge=0, le=3650)
    max_days: int = _opt(730, "drop contracts with more calendar days to expiry", ge=1, le=36500)
    max_log_moneyness: float = _opt(
        0.5, "drop contracts with |ln(K/S)| above this (deep in or out of the money: stale vendor artefacts)",
        gt=0, le=10)
    rate: float = _opt(0.0, "risk-free rate per annum (decimal, continuously compounded) when rate_ticker is null",
                       ge=-0.1, le=1)
    rate_ticker: str | None = _opt(
        None, "a rate series in percent per annum, e.g. ^IRX (13-week T-bill), read like the data section's "
              "tickers (same source; csv files from options.aux_path)")
    vol_index: str | None = _opt(
        None, "a volatility index in percent, e.g. ^VIX, for the Black-Scholes-with-index baseline; null = none")
    aux_path: str | None = _opt(None, "csv source: directory of the rate and vol-index files; null = data.path")
    dividend_yield: float = _opt(0.0, "continuous dividend yield of the underlying per annum", ge=0, le=1)
    target: Literal["price", "iv"] = _opt(
        "price", "what the network predicts: price (market price / strike) or iv (Black-Scholes implied vol)")
    abs_returns: bool = _opt(True, "feed |return| beside each return (two channels per day)")
    hist_vols: tuple[int, ...] = _opt(
        (20, 60), "Black-Scholes baselines with realised volatility over these many days", min_len=0, item_ge=2)
    moneyness_buckets: tuple[float, ...] = _opt(
        (0.9, 0.97, 1.03, 1.1), "bucket edges of K/S in the error tables and heatmap", min_len=1)
    maturity_buckets: tuple[int, ...] = _opt(
        (14, 30, 60, 120), "bucket edges of calendar days to expiry in the error tables and heatmap", min_len=1)
    seeds: int = _opt(
        3, "training seeds of a `fincast train` options run: the run's model is train.seed's; train.seed + 1, ... "
           "train again beside it in one stack (same data, clip and schedule) for the report's seed spread "
           "(1 = none; a study's runs never do, their seeds are the study's)", ge=1, le=100)
    heston: HestonConfig = field(default_factory=HestonConfig)


@dataclass(frozen=True)
class PipelineConfig:
    name: str = _opt("fincast", "pipeline name; also the default MLflow experiment")
    task: Literal["forecast", "options"] = _opt(
        "forecast", "forecast: next-period log returns of data.tickers; options: option prices (the options section)")
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    backtest: BacktestConfig = field(default_factory=BacktestConfig)
    options: OptionsConfig = field(default_factory=OptionsConfig)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if tp is dt.date:
        return "a date YYYY-MM-DD"
    return {float: "a number", int: "an integer", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:g}"
    if isinstance(v, dt.date):
        return v.isoformat()
    return repr(v) if isinstance(v, str) else str(v)


def fields(cls: Any) -> list[dataclasses.Field]:
    """Dataclass fields, a class's own before inherited ones (``clip.norm.max_norm`` before its schedule)."""
    own = cls.__dict__.get("__annotations__", {})
    fs = dataclasses.fields(cls)
    return [f for f in fs if f.name in own] + [f for f in fs if f.name not in own]


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict of a config (dates as ISO strings, tuples as lists)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = [(clip_section(x) if isinstance(x, ClipConfig) else to_dict(x)) if dataclasses.is_dataclass(x)
                           else x for x in v]
        elif isinstance(v, dt.date):
            out[f.name] = v.isoformat()
        else:
            out[f.name] = v
    return out
