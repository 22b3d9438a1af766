"""A linear classifier on fixed features: the paper's "features + linear SVM" (sec. 5.3.3).

Transfer by features feeds a frozen network's pyramid features (R·K numbers per image) to a
multiclass linear classifier trained on the target data.  Two losses, both smooth so that a
full-batch quasi-Newton solver (SciPy's L-BFGS-B) converges on our own loss and gradient:

* ``"svm"``: the one-vs-rest *squared* hinge, LIBLINEAR's default multiclass linear SVM
  (L2-regularised L2-loss SVC, one-vs-rest), which is what the "CNN features + linear SVM"
  baselines the paper cites use.  With targets t_ny = +1 for the label, -1 otherwise,

      L = 1/N Σ_n Σ_y max(0, 1 - t_ny s_ny)²,   dL/ds_ny = -2 t_ny max(0, 1 - t_ny s_ny) / N.

  The squared hinge has a continuous gradient; the plain (Weston–Watkins or Crammer–Singer)
  hinge is not differentiable at its kinks, where L-BFGS's line search stalls.  The plain
  Weston–Watkins hinge of ``losses.multiclass_hinge_loss`` is the one networks train with.
* ``"softmax"``: ``losses.softmax_cross_entropy`` (multinomial logistic regression).

Both add (λ/2)·||W||²_F (the bias is not regularised):

    J(W, b) = L(X W + b, y) + λ/2 ||W||²,   dJ/dW = Xᵀ dL/ds + λ W,   dJ/db = Σ_n dL/ds_n.

λ is chosen on a held-out, class-stratified part of the training set (``choose_lambda``),
then the classifier is refitted on all of it.  Features are standardised (zero mean, unit
variance per feature, statistics of the training set): pyramid features are non-negative
max-pool outputs of very different scales across feature maps, and standardising makes one λ
fit every feature and the solver converge in fewer iterations.

SciPy works on the host in float64, so this module is NumPy only (features computed on a GPU
are brought to the host first, ``backend.to_cpu``).
"""
import numpy as np
from scipy.optimize import minimize

from .losses import accuracy_topk, check_labels, softmax, softmax_cross_entropy

LOSSES = ("svm", "softmax")
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # choose_lambda's default grid (1e-4..1 chose 1, its edge, on CIFAR)


def squared_hinge_ovr(scores, labels):
    """Mean one-vs-rest squared hinge loss (LIBLINEAR's L2-loss SVM) and its gradient.

    scores: (N, Y) float; labels: (N,) integers in [0, Y).
    L = 1/N Σ_n Σ_y max(0, 1 - t_ny s_ny)², t_ny = +1 if y = label_n else -1.
    Returns (loss: float, dscores: (N, Y)).
    """
    n, y = scores.shape
    labels = check_labels(labels, y, "squared_hinge_ovr")
    t = -np.ones_like(scores)
    t[np.arange(n), labels] = 1.0
    slack = np.maximum(0.0, 1.0 - t * scores)         # (N, Y)
    return float((slack * slack).sum() / n), -2.0 * t * slack / n


DATA_LOSSES = {"svm": squared_hinge_ovr, "softmax": softmax_cross_entropy}


def objective(theta, X, labels, num_classes, lam, loss="svm"):
    """J(W, b) and its gradient, for the flat parameter vector theta = [W.ravel(), b].

    X: (N, D) features; labels: (N,); W: (D, Y); lam: λ >= 0; loss: "svm" or "softmax".
    Returns (value: float, grad: (D·Y + Y,) float64), what ``scipy.optimize.minimize`` wants.
    """
    d = X.shape[1]
    W = theta[:d * num_classes].reshape(d, num_classes)
    b = theta[d * num_classes:]
    scores = X @ W + b                                  # (N, Y)
    value, dscores = DATA_LOSSES[loss](scores, labels)
    dW = X.T @ dscores + lam * W
    grad = np.concatenate([dW.ravel(), dscores.sum(axis=0)])
    return float(value) + 0.5 * lam * float((W * W).sum()), grad


class LinearClassifier:
    """ℓ2-regularised linear classifier on features, fitted full-batch with L-BFGS-B.

    loss: "svm" (one-vs-rest squared hinge) or "softmax"; lam: λ; standardize: scale each
    feature to zero mean, unit variance with the training set's statistics (before the
    linear map); max_iter: L-BFGS iterations.  After ``fit``: ``W`` (D, Y), ``b`` (Y,).
    """

    def __init__(self, loss="svm", lam=1e-2, standardize=True, max_iter=500):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.loss, self.lam, self.standardize, self.max_iter = loss, float(lam), standardize, int(max_iter)
        self.W = self.b = self.mean = self.scale = None

    def _prepare(self, X):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"expected features of shape (N, D), got {X.shape}")
        if self.mean is None:
            return X
        return (X - self.mean) / self.scale

    def fit(self, X, labels, num_classes, warm_start=None):
        """Fit on X (N, D) and labels (N,) in [0, num_classes); warm_start: an earlier fit's
        (W, b) to start from (``choose_lambda`` walks its grid that way).  Returns self."""
        X = np.asarray(X, dtype=np.float64)
        labels = check_labels(labels, num_classes, "LinearClassifier.fit")
        if self.standardize:
            self.mean = X.mean(axis=0)
            std = X.std(axis=0)
            self.scale = np.where(std > 1e-12, std, 1.0)  # a constant feature stays 0
        X = self._prepare(X)
        d = X.shape[1]
        theta0 = (np.zeros(d * num_classes + num_classes) if warm_start is None
                  else np.concatenate([warm_start[0].ravel(), warm_start[1]]))
        result = minimize(objective, theta0, args=(X, labels, num_classes, self.lam, self.loss),
                          jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.W = result.x[:d * num_classes].reshape(d, num_classes)
        self.b = result.x[d * num_classes:]
        self.result = result
        return self

    def scores(self, X):
        """Class scores (N, Y) of features X (N, D); X (N, C, D) of C crops each averages the
        crops' scores (SVM decision values) or probabilities (softmax), sec. 5.1's ten crops."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 3:
            n, c, d = X.shape
            s = self.scores(X.reshape(n * c, d)).reshape(n, c, -1)
            if self.loss == "softmax":
                return np.log(np.maximum(softmax(s).mean(axis=1), 1e-300))
            return s.mean(axis=1)
        return self._prepare(X) @ self.W + self.b

    def errors(self, X, labels, ks=(1, 5)):
        """Top-k errors in % of features X ((N, D) or (N, C, D)) against labels (N,)."""
        counts = accuracy_topk(self.scores(X), np.asarray(labels), ks)
        return tuple(100.0 * (1 - int(c) / len(labels)) for c in counts)


def stratified_split(labels, fraction=0.2, seed=0):
    """(train indices, held-out indices): ``fraction`` of each class held out (at least one
    image of a class with two or more), chosen at random with ``seed``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(fraction * idx.size)) if idx.size > 1 else 0
        held.append(idx[:max(k, 1 if idx.size > 1 else 0)])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(labels.size), held), held


def choose_lambda(X, labels, num_classes, loss="svm", grid=LAMBDAS, fraction=0.2, seed=0,
                  standardize=True, max_iter=500):
    """λ of ``grid`` with the lowest held-out top-1 error (ties: the larger λ, the simpler
    model); the fits walk the grid from the largest λ down, each warm-started from the last.

    Returns (best λ, {λ: held-out top-1 error in %}).
    """
    fit_idx, held_idx = stratified_split(labels, fraction, seed)
    X, labels = np.asarray(X), np.asarray(labels)
    table, start = {}, None
    for lam in sorted(grid, reverse=True):
        clf = LinearClassifier(loss, lam, standardize, max_iter).fit(X[fit_idx], labels[fit_idx],
                                                                     num_classes, warm_start=start)
        start = (clf.W, clf.b)
        table[lam] = clf.errors(X[held_idx], labels[held_idx], ks=(1,))[0]
    best = min(table.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    return best, table


def fit_linear(X, labels, num_classes, loss="svm", grid=LAMBDAS, seed=0, standardize=True,
               max_iter=500):
    """``choose_lambda``, then a fit on all of X with the chosen λ.

    Returns (LinearClassifier, {"lambda": λ, "held_out_top1_error": {λ: %}}).
    """
    lam, table = choose_lambda(X, labels, num_classes, loss, grid, seed=seed,
                               standardize=standardize, max_iter=max_iter)
    clf = LinearClassifier(loss, lam, standardize, max_iter).fit(X, labels, num_classes)
    return clf, {"lambda": lam, "held_out_top1_error": {f"{k:g}": v for k, v in table.items()}}
