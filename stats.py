"""The statistics every report uses: Wilson intervals of an accuracy, t intervals of a mean over
seeds, and the exact McNemar test of two models on the same images."""
import math


def ci95(correct, n):
    """The 95% Wilson score interval of an accuracy of `correct` out of `n`, as [low, high] in percent
    rounded to 2 decimals (scipy.stats.binomtest(...).proportion_ci(method="wilson"))."""
    from scipy.stats import binomtest
    ci = binomtest(int(correct), int(n)).proportion_ci(0.95, method="wilson")
    return [round(100 * float(ci.low), 2), round(100 * float(ci.high), 2)]


def ci_text(ci):
    return f"95% CI {ci[0]:.2f}-{ci[1]:.2f}"


def mean_ci95(values):
    """The 95% Student t interval of the mean of `values` (say, one accuracy per seed: n - 1 degrees
    of freedom) as [low, high] rounded to 2 decimals; None for fewer than two values."""
    if len(values) < 2:
        return None
    from scipy import stats
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return [round(mean, 2), round(mean, 2)]
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return [round(float(low), 2), round(float(high), 2)]


def paired(a_right, b_right):
    """Two models' right/wrong on the same images (bool tensors or arrays): the 2x2 table and the
    exact McNemar test, i.e. the two-sided binomial test (p = 1/2) on the discordant pairs."""
    from scipy.stats import binomtest
    a_right, b_right = [bool(v) for v in a_right], [bool(v) for v in b_right]
    table = dict(both_right=sum(a and b for a, b in zip(a_right, b_right)),
                 only_a_wrong=sum(b and not a for a, b in zip(a_right, b_right)),
                 only_b_wrong=sum(a and not b for a, b in zip(a_right, b_right)),
                 both_wrong=sum(not a and not b for a, b in zip(a_right, b_right)))
    discordant = table["only_a_wrong"] + table["only_b_wrong"]
    p = binomtest(table["only_a_wrong"], discordant).pvalue if discordant else 1.0
    return dict(table, mcnemar_p=float(p))


def verdict(t, a="A", b="B", level=0.05):
    """One line on a paired() result: which is better at `level`, or no significant difference."""
    if t["mcnemar_p"] < level:
        better, worse = (b, a) if t["only_a_wrong"] > t["only_b_wrong"] else (a, b)
        return f"{better} is better than {worse} at the {level:.0%} level (exact McNemar p = {t['mcnemar_p']:.3g})"
    return f"no significant difference at the {level:.0%} level (exact McNemar p = {t['mcnemar_p']:.3g})"
