"""Accounting equals `dp_accounting`'s own computation, and calibration round-trips."""

import dp_accounting
import pytest

import eqx_micro.dp as dp


def reference_epsilon(accountant, event, delta):
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize(
    "sigma,steps,q,delta",
    [
        (1.1, 14062, 256 / 60000, 1e-5),
        (3.0, 512, 0.1, 1e-6),
        (0.6, 7031, 256 / 60000, 1e-5),
    ],
)
@pytest.mark.parametrize("accountant", list(dp.Accountant))
def test_dpsgd_epsilon_equals_dp_accounting(sigma, steps, q, delta, accountant):
    event = dp.dpsgd_event(sigma, steps, sampling_prob=q)
    fresh = (
        dp_accounting.pld.PLDAccountant()
        if accountant is dp.Accountant.PLD
        else dp_accounting.rdp.RdpAccountant()
    )
    expected = reference_epsilon(fresh, event, delta)
    assert dp.compute_epsilon(event, delta, accountant=accountant) == pytest.approx(
        expected, rel=1e-6
    )


def test_published_anchor_values():
    mnist = dp.dpsgd_event(1.1, 14062, sampling_prob=256 / 60000)
    assert dp.compute_epsilon(mnist, 1e-5) == pytest.approx(2.382, abs=2e-3)
    assert dp.compute_epsilon(mnist, 1e-5, accountant=dp.Accountant.RDP) == pytest.approx(
        2.597, abs=2e-3
    )
    replace_one = dp.NeighboringRelation.REPLACE_ONE
    assert dp.compute_epsilon(
        mnist, 1e-5, neighboring_relation=replace_one
    ) == pytest.approx(4.221, abs=5e-3)


def test_truncated_and_fixed_batch_events_equal_dp_accounting():
    event = dp.truncated_dpsgd_event(
        1.1, 200, sampling_prob=0.01, num_examples=10_000, truncated_batch_size=110
    )
    expected = reference_epsilon(dp_accounting.pld.PLDAccountant(), event, 1e-5)
    assert dp.compute_epsilon(event, 1e-5) == pytest.approx(expected, rel=1e-6)
    fixed = dp.fixed_batch_dpsgd_event(1.1, 200, num_examples=10_000, batch_size=100)
    replace_one = dp.NeighboringRelation.REPLACE_ONE
    expected = reference_epsilon(
        dp_accounting.rdp.RdpAccountant(neighboring_relation=replace_one), fixed, 1e-5
    )
    assert dp.compute_epsilon(
        fixed, 1e-5, accountant=dp.Accountant.RDP, neighboring_relation=replace_one
    ) == pytest.approx(expected, rel=1e-6)


def test_accountant_instances_are_copied_fresh():
    accountant = dp_accounting.rdp.RdpAccountant(orders=[2.0, 4.0, 8.0, 16.0, 32.0])
    event = dp.dpsgd_event(1.0, 100, sampling_prob=0.01)
    expected = reference_epsilon(
        dp_accounting.rdp.RdpAccountant(orders=[2.0, 4.0, 8.0, 16.0, 32.0]), event, 1e-5
    )
    assert dp.compute_epsilon(event, 1e-5, accountant=accountant) == pytest.approx(expected)
    assert dp.compute_epsilon(event, 1e-5, accountant=accountant) == pytest.approx(expected)
    accountant.compose(event)
    with pytest.raises(ValueError, match="already composed events"):
        dp.compute_epsilon(event, 1e-5, accountant=accountant)


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibration_round_trip(target):
    make = lambda s: dp.dpsgd_event(s, 512, sampling_prob=0.1)
    sigma = dp.calibrate_noise_multiplier(make, target, 1e-6)
    epsilon = dp.compute_epsilon(make(sigma), 1e-6)
    assert epsilon <= target and epsilon == pytest.approx(target, rel=1e-2)
    if target == 1.0:
        assert sigma == pytest.approx(9.662, abs=0.02)


def test_microbatching_does_not_change_accounting():
    # One event per optimizer update: the event depends on steps, q and sigma only.
    assert dp.dpsgd_event(1.0, 10, sampling_prob=0.1) == dp.dpsgd_event(
        1.0, 10, sampling_prob=0.1
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: dp.dpsgd_event(-1.0, 10, sampling_prob=0.1), "`noise_multiplier`"),
        (lambda: dp.dpsgd_event(1.0, -1, sampling_prob=0.1), "`iterations`"),
        (
            lambda: dp.dpsgd_event(1.0, 10, sampling_prob=0.0),
            r"`sampling_prob` must be in \(0",
        ),
        (lambda: dp.dpsgd_event(1.0, 10, sampling_prob=1.5), "`sampling_prob`"),
        (
            lambda: dp.compute_epsilon(dp.dpsgd_event(1.0, 1, sampling_prob=0.1), 0.0),
            "`delta`",
        ),
        (
            lambda: dp.compute_epsilon(dp.dpsgd_event(1.0, 1, sampling_prob=0.1), 1.0),
            "`delta`",
        ),
        (
            lambda: dp.calibrate_noise_multiplier(lambda s: None, 0.0, 1e-5),
            "`target_epsilon=0.0`",
        ),
        (lambda: dp.calibrate_noise_multiplier(lambda s: None, 1.0, 2.0), "`target_delta`"),
        (
            lambda: dp.truncated_dpsgd_event(
                1.0, 1, sampling_prob=0.1, num_examples=0, truncated_batch_size=1
            ),
            "`num_examples`",
        ),
        (
            lambda: dp.fixed_batch_dpsgd_event(1.0, 1, num_examples=5, batch_size=6),
            "`batch_size`",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unsupported_event_is_an_error():
    fixed = dp.fixed_batch_dpsgd_event(1.0, 10, num_examples=100, batch_size=10)
    with pytest.raises(ValueError, match="does not support this event"):
        dp.compute_epsilon(fixed, 1e-5, accountant=dp.Accountant.RDP)  # needs REPLACE_ONE


@pytest.mark.parametrize(
    "steps, sampling_prob, target",
    [(100, 0.05, 8.0), (1000, 0.01, 1.0), (30, 0.5, 2.0)],
)
def test_calibration_equals_dp_accountings_own(steps, sampling_prob, target):
    # The default "pld" calibration starts its exact search from a coarse-grid answer;
    # the result must be dp_accounting's own calibration (same accountant, same tol).
    make = lambda s: dp.dpsgd_event(s, steps, sampling_prob=sampling_prob)
    ours = dp.calibrate_noise_multiplier(make, target, 1e-5, tol=1e-3)
    theirs = dp_accounting.calibrate_dp_mechanism(
        lambda: dp_accounting.pld.PLDAccountant(dp.NeighboringRelation.ADD_OR_REMOVE_ONE),
        make,
        target,
        1e-5,
        tol=1e-3,
    )
    assert ours == pytest.approx(theirs, abs=2e-3)
    assert dp.compute_epsilon(make(ours), 1e-5) <= target


def test_accounting_is_quiet_and_leaves_logging_alone(caplog):
    """dp_accounting's RDP logs a warning per order it skips; nobody asked for them.
    Two threads accounting at once (the progress bar does) leave the level as it was,
    and the user's own dp_accounting calls still log."""
    import logging
    import threading

    logger = logging.getLogger("absl")
    level = logger.level
    event = dp.dpsgd_event(1.0, 10, sampling_prob=0.25)
    results = []

    def account():
        return dp.compute_epsilon(event, 1e-5, accountant=dp.Accountant.RDP)

    with caplog.at_level(logging.WARNING, logger="absl"):
        threads = [
            threading.Thread(target=lambda: results.append(account())) for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        results.append(account())
        for thread in threads:
            thread.join()
        assert len(results) == 4 and len(set(results)) == 1
        assert not caplog.records
        dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
        assert caplog.records  # outside our calls, dp_accounting speaks as before
    assert logger.level == level


@pytest.mark.parametrize(
    "event",
    [
        dp.dpsgd_event(0.05, 100, sampling_prob=0.01),
        dp_accounting.ComposedDpEvent(
            [
                dp.dpsgd_event(1.0, 10, sampling_prob=0.1),
                dp_accounting.GaussianDpEvent(0.09),
            ]
        ),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.02), 3),
    ],
)
def test_pld_refuses_noise_too_small_to_discretize(event):
    # The PLD grid at these noise multipliers takes minutes and gigabytes: a clear error
    # naming the fix instead of a hang. RDP answers the same event at once, and a PLD
    # accountant the user configures is taken as given.
    with pytest.raises(ValueError, match=r"accountant=dp\.Accountant\.RDP"):
        dp.compute_epsilon(event, 1e-5)
    assert dp.compute_epsilon(event, 1e-5, accountant=dp.Accountant.RDP) > 10


def test_pld_still_accounts_small_noise_and_no_noise():
    event = dp.dpsgd_event(0.5, 1, sampling_prob=0.01)
    pld = dp.compute_epsilon(event, 1e-5)
    expected = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert pld == pytest.approx(expected, rel=1e-9)
    assert dp.compute_epsilon(dp.dpsgd_event(0.0, 1, sampling_prob=0.01), 1e-5) == float(
        "inf"
    )
