from se_compress.detect.rule import Criterion, considered_layers, massive_activation_layers, select_super_experts


def test_quantile_selects_at_most_its_share_and_says_so():
    values = {(1, e): 1.0 for e in range(30)}
    values[(1, 3)], values[(2, 7)] = 500.0, 400.0  # two outliers among 32 experts
    values[(2, 0)] = 1.0
    sel = select_super_experts(values, [1, 2], Criterion())
    assert sel["super_experts"] == [(1, 3)]        # P99.5 over 32 values leaves room for one
    assert sel["quantile_limited"] and sel["by_max_fraction_only"] == [(1, 3), (2, 7)]
    sel = select_super_experts(values, [1, 2], Criterion(quantile=0.9))
    assert sel["super_experts"] == [(1, 3), (2, 7)] and not sel["quantile_limited"]


def test_max_fraction_rule_rejects_moderate_outliers():
    values = {(0, e): 1.0 for e in range(400)}
    values[(0, 1)], values[(0, 2)] = 1000.0, 50.0  # 50 is above P99.5 but below max/10
    assert select_super_experts(values, [0], Criterion())["super_experts"] == [(0, 1)]


def test_layer_choices():
    massive = massive_activation_layers([1.0, 500.0, 400.0, 2.0], [1.0, 1.0, 1.0, 1.0], 100.0)
    assert massive == [1, 2]
    assert considered_layers(Criterion(layers="auto"), [0, 1, 2, 3], massive, 4)[0] == [1, 2]
    assert considered_layers(Criterion(layers="paper"), [0, 1, 2, 3], massive, 4)[0] == [0, 1, 2]
    layers, note = considered_layers(Criterion(layers="auto"), [0, 1, 2, 3], [], 4)
    assert layers == [0, 1, 2, 3] and "no massive activation" in note
