#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/cosine_scores_kernel.h"
#include "cpu/expert_choice_kernel.h"
#include "cpu/make_plan_kernel.h"
#include "cpu/permute_kernel.h"
#include "cpu/topk_sigmoid_kernel.h"
#include "cpu/topk_softmax_kernel.h"
#include "cpu/unified_topk_kernel.h"

namespace {

using smoe::cpu::make_plan;

TEST(TopkSoftmax, PicksLargestWithLowerIndexOnTies) {
  const std::vector<float> logits = {0.f, 1.f, 1.f, 0.f, 1.f};
  std::vector<float> w(3);
  std::vector<int32_t> e(3);
  EXPECT_EQ(
      smoe::cpu::topk_softmax(logits.data(), 5, 5, 3, true, nullptr, 0, 1, w.data(), e.data()),
      -1);
  EXPECT_EQ(e, (std::vector<int32_t>{1, 2, 4}));
  for (float v : w) EXPECT_NEAR(v, 1.0f / 3, 1e-6);
}

TEST(TopkSoftmax, RawProbabilitiesWithoutRenormalize) {
  const std::vector<double> logits = {std::log(1.0), std::log(3.0), std::log(6.0)};
  std::vector<double> w(2);
  std::vector<int32_t> e(2);
  smoe::cpu::topk_softmax(logits.data(), 3, 3, 2, false, nullptr, 0, 1, w.data(), e.data());
  EXPECT_EQ(e, (std::vector<int32_t>{2, 1}));
  EXPECT_NEAR(w[0], 0.6, 1e-12);
  EXPECT_NEAR(w[1], 0.3, 1e-12);
}

TEST(TopkSoftmax, SelectionBiasPicksButDoesNotWeigh) {
  // Logits favour experts 2, 1; the bias moves expert 0 to the top. Weights: the unbiased
  // softmax over the selected {0, 2} (renormalised), so exp(0) : exp(2).
  const std::vector<double> logits = {0.0, 1.0, 2.0};
  const std::vector<float> bias = {5.f, 0.f, 0.f};
  std::vector<double> w(2);
  std::vector<int32_t> e(2);
  smoe::cpu::topk_softmax(logits.data(), 3, 3, 2, true, bias.data(), 0, 1, w.data(), e.data());
  EXPECT_EQ(e, (std::vector<int32_t>{0, 2}));
  EXPECT_NEAR(w[0], 1.0 / (1.0 + std::exp(2.0)), 1e-12);
  EXPECT_NEAR(w[1], std::exp(2.0) / (1.0 + std::exp(2.0)), 1e-12);
}

TEST(TopkSoftmax, ReportsTheFirstNanRow) {
  const std::vector<float> logits = {0.f, 1.f, 2.f, NAN, 5.f, 6.f};
  std::vector<float> w(2);
  std::vector<int32_t> e(2);
  EXPECT_EQ(
      smoe::cpu::topk_softmax(logits.data(), 2, 2, 1, true, nullptr, 0, 3, w.data(), e.data()),
      1);
}

TEST(TopkSoftmax, BackwardOfRenormalizedWeights) {
  // Two selected of three: d l[e_j] = w_j (g_j - <g, w>), unselected get 0.
  const std::vector<double> logits = {0.0, 1.0, -1.0};
  const std::vector<int32_t> e = {1, 0};
  const std::vector<double> g = {1.0, 0.0};
  std::vector<double> out(3);
  smoe::cpu::topk_softmax_backward(g.data(), logits.data(), 3, e.data(), 3, 2, true, 0, 1,
                                        out.data());
  const double w1 = std::exp(1.0) / (std::exp(1.0) + 1.0), w0 = 1.0 - w1;
  EXPECT_NEAR(out[1], w1 * (1.0 - w1), 1e-12);
  EXPECT_NEAR(out[0], -w0 * w1, 1e-12);
  EXPECT_EQ(out[2], 0.0);
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

TEST(TopkSigmoid, GroupsLimitTheChoice) {
  // Group 0 (experts 0..3) holds the best expert, group 1 the two next-best: one group kept,
  // group 1 wins on its top-2 sum. Weights: raw s times scale.
  const std::vector<float> logits = {4.f, -5.f, -5.f, -5.f, 3.f, 3.f, -5.f, -5.f};
  std::vector<float> w(2);
  std::vector<int32_t> e(2);
  EXPECT_EQ(smoe::cpu::topk_sigmoid(logits.data(), 8, 8, 2, 2, 1, false, 2.5, nullptr, 0, 1,
                                         w.data(), e.data()),
            -1);
  EXPECT_EQ(e, (std::vector<int32_t>{4, 5}));
  for (float v : w) EXPECT_NEAR(v, 2.5 * sigmoid(3.0), 1e-6);
  smoe::cpu::topk_sigmoid(logits.data(), 8, 8, 2, 1, 1, false, 2.5, nullptr, 0, 1, w.data(),
                               e.data());
  EXPECT_EQ(e, (std::vector<int32_t>{0, 4}));  // without groups the best expert comes first
}

TEST(TopkSigmoid, SelectionBiasPicksButDoesNotWeigh) {
  // s favours experts 2, 1; the bias moves expert 0 to the top. Weights: s of {0, 2} over their
  // sum + 1e-20.
  const std::vector<double> logits = {0.0, 1.0, 2.0};
  const std::vector<float> bias = {5.f, 0.f, 0.f};
  std::vector<double> w(2);
  std::vector<int32_t> e(2);
  smoe::cpu::topk_sigmoid(logits.data(), 3, 3, 2, 1, 1, true, 1.0, bias.data(), 0, 1, w.data(),
                               e.data());
  EXPECT_EQ(e, (std::vector<int32_t>{0, 2}));
  const double S = sigmoid(0.0) + sigmoid(2.0);
  EXPECT_NEAR(w[0], sigmoid(0.0) / S, 1e-12);
  EXPECT_NEAR(w[1], sigmoid(2.0) / S, 1e-12);
}

TEST(TopkSigmoid, MultiPassSelectionTiesToLowerIndex) {
  // k = 33 and topk_group = 34 of 40 one-expert groups: past the single-pass buffer of 32.
  std::vector<float> logits(40, 0.f);
  logits[7] = 1.f;
  std::vector<float> w(33);
  std::vector<int32_t> e(33);
  smoe::cpu::topk_sigmoid(logits.data(), 40, 40, 33, 40, 34, false, 1.0, nullptr, 0, 1,
                               w.data(), e.data());
  std::vector<int32_t> want = {7};
  for (int32_t i = 0; static_cast<int64_t>(want.size()) < 33; ++i) {
    if (i != 7) want.push_back(i);
  }
  EXPECT_EQ(e, want);
}

TEST(TopkSigmoid, ReportsTheFirstNanRow) {
  const std::vector<float> logits = {0.f, 1.f, 2.f, NAN, 5.f, NAN};
  std::vector<float> w(3);
  std::vector<int32_t> e(3);
  EXPECT_EQ(smoe::cpu::topk_sigmoid(logits.data(), 2, 2, 1, 1, 1, true, 1.0, nullptr, 0, 3,
                                         w.data(), e.data()),
            1);
}

TEST(TopkSigmoid, BackwardOfRenormalizedAndRawWeights) {
  // w_j = c s_j / S: d l_i = c (g_j / S - <g, s> / S^2) s_i (1 - s_i); raw: c g_j s_i (1 - s_i).
  const std::vector<double> logits = {0.5, -1.0, 2.0};
  const std::vector<int32_t> e = {2, 0};
  const std::vector<double> g = {1.0, -0.5};
  const double c = 2.0, s0 = sigmoid(0.5), s2 = sigmoid(2.0), S = s0 + s2;
  const double dot = g[0] * s2 + g[1] * s0;
  std::vector<double> out(3);
  smoe::cpu::topk_sigmoid_backward_rows(g.data(), logits.data(), 3, e.data(), 3, 2, true, c, 0, 1,
                                        out.data());
  EXPECT_NEAR(out[2], c * (g[0] / S - dot / (S * S)) * s2 * (1 - s2), 1e-12);
  EXPECT_NEAR(out[0], c * (g[1] / S - dot / (S * S)) * s0 * (1 - s0), 1e-12);
  EXPECT_EQ(out[1], 0.0);
  smoe::cpu::topk_sigmoid_backward_rows(g.data(), logits.data(), 3, e.data(), 3, 2, false, c, 0, 1,
                                        out.data());
  EXPECT_NEAR(out[2], c * g[0] * s2 * (1 - s2), 1e-12);
  EXPECT_NEAR(out[0], c * g[1] * s0 * (1 - s0), 1e-12);
  EXPECT_EQ(out[1], 0.0);
}

// unified_topk over groups [0, G) of rows with stride ld: the indices, or the first NaN group.
template <typename T>
std::pair<std::vector<int64_t>, int64_t> run_unified(const std::vector<T>& s, int64_t G, int64_t ld,
                                                     int64_t L, int64_t n,
                                                     const int64_t* counts = nullptr) {
  std::vector<int64_t> out(G * n, 7);
  const int64_t bad = smoe::cpu::unified_topk_rows(s.data(), ld, L, n, counts, 0, G, out.data());
  return {out, bad};
}

TEST(UnifiedTopk, TiesAndSignedZerosGoToTheLowerIndexInAscendingOrder) {
  // Row 0: the 2s, then the first two of the tied 1s. Row 1: -0 == +0, index order decides.
  const std::vector<float> s = {0.f, 2.f, 1.f, 2.f, 1.f, 1.f, -0.f, 0.f, -0.f, -1.f, 0.f, -2.f};
  EXPECT_EQ(run_unified(s, 2, 6, 6, 4),
            std::make_pair(std::vector<int64_t>{1, 2, 3, 4, 0, 1, 2, 4}, int64_t(-1)));
  // bf16 and double: the same choice through the storage types' loads.
  std::vector<smoe::bfloat16_t> b;
  for (float v : s) b.push_back(smoe::to_bfloat16(v));
  EXPECT_EQ(run_unified(b, 2, 6, 6, 4).first, (std::vector<int64_t>{1, 2, 3, 4, 0, 1, 2, 4}));
  // double keeps 1 + 2^-52 above 1 (float would tie them and take index 0)
  EXPECT_EQ(run_unified(std::vector<double>{1.0, 1.0 + 0x1.0p-52}, 1, 2, 2, 1).first,
            (std::vector<int64_t>{1}));
}

TEST(UnifiedTopk, PlusInfFirstMinusInfLastAndAnAllPaddingGroup) {
  const float inf = INFINITY;
  const std::vector<float> s = {-inf, -5.f, inf, -inf, -7.f, -inf, -inf, -inf, -inf, -inf};
  EXPECT_EQ(run_unified(s, 2, 5, 5, 4),
            std::make_pair(std::vector<int64_t>{0, 1, 2, 4, 0, 1, 2, 3}, int64_t(-1)));
}

TEST(UnifiedTopk, CountsCutEachGroupAndReadOnlyLOfEachRow) {
  // Rows of L = 4 with stride 5: the NaN past L is not a score. counts {0, 2, 3} of n = 3.
  const std::vector<float> s = {3.f, 2.f, 1.f, 0.f, NAN, 0.f, 5.f, 5.f,
                                9.f, NAN, 1.f, 1.f, 1.f, 1.f, NAN};
  const std::vector<int64_t> counts = {0, 2, 3};
  EXPECT_EQ(run_unified(s, 3, 5, 4, 3, counts.data()),
            std::make_pair(std::vector<int64_t>{-1, -1, -1, 1, 3, -1, 0, 1, 2}, int64_t(-1)));
  EXPECT_EQ(run_unified(s, 3, 5, 4, 0).first.size(), 0u);  // n = 0 writes nothing
}

TEST(UnifiedTopk, ReportsTheFirstNanGroupOfItsRange) {
  // Groups 1 (count 0: still an error) and 2 hold a NaN.
  const std::vector<float> s = {1.f, 2.f, 0.f, NAN, 3.f, 4.f, NAN, 5.f, 6.f};
  const std::vector<int64_t> counts = {1, 0, 1};
  std::vector<int64_t> out(3);
  EXPECT_EQ(smoe::cpu::unified_topk_rows(s.data(), 3, 3, 1, counts.data(), 0, 3, out.data()), 1);
  EXPECT_EQ(smoe::cpu::unified_topk_rows(s.data(), 3, 3, 1, counts.data(), 2, 3, out.data()), 2);
  EXPECT_EQ(smoe::cpu::unified_topk_rows(s.data(), 3, 3, 1, counts.data(), 0, 1, out.data()), -1);
  EXPECT_EQ(out[0], 1);
}

struct PlanOut {
  std::vector<int64_t> offsets;
  std::vector<int32_t> token, slot, row;
  std::vector<char> kept;
};

PlanOut run_plan(const std::vector<int32_t>& expert, int64_t T, int64_t k, int64_t E, int64_t cap,
                 const int32_t* order = nullptr, int64_t order_ranks = 0) {
  PlanOut p{std::vector<int64_t>(E + 1), std::vector<int32_t>(T * k), std::vector<int32_t>(T * k),
            std::vector<int32_t>(T * k), std::vector<char>(T * k)};
  std::vector<int64_t> fill(E);
  bool* kept = reinterpret_cast<bool*>(p.kept.data());
  make_plan(expert.data(), T, k, E, cap, order, order_ranks, p.offsets.data(), p.token.data(),
            p.slot.data(), p.row.data(), kept, fill.data());
  return p;
}

TEST(MakePlan, StableSortByExpert) {
  const std::vector<int32_t> expert = {1, 0, 2, 0, 0, 1};  // T = 3, k = 2
  PlanOut p = run_plan(expert, 3, 2, 3, -1);
  EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 3, 5, 6}));
  EXPECT_EQ(p.token, (std::vector<int32_t>{0, 1, 2, 0, 2, 1}));
  EXPECT_EQ(p.slot, (std::vector<int32_t>{1, 3, 4, 0, 5, 2}));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(p.row[p.slot[i]], i);
}

TEST(MakePlan, CapacityIsRankMajorAndUnassignedIsSkipped) {
  const std::vector<int32_t> expert = {1, 0, 2, 0, 0, -1};  // token 2's first choice beats seconds
  PlanOut p = run_plan(expert, 3, 2, 3, 2);
  EXPECT_EQ(p.offsets, (std::vector<int64_t>{0, 2, 3, 4}));
  EXPECT_EQ(p.kept, (std::vector<char>{1, 1, 1, 0, 1, 0}));
  EXPECT_EQ(p.token, (std::vector<int32_t>{0, 2, 0, 1, -1, -1}));
  EXPECT_EQ(p.row[3], -1);
  EXPECT_EQ(p.row[5], -1);
}

TEST(MakePlan, BatchPrioritizedRoutingKeepsHighPriorityFirst) {
  // Four tokens all pick expert 0 first; capacity 2; priorities favour tokens 3 and 1.
  const std::vector<int32_t> expert = {0, 0, 0, 0};  // T = 4, k = 1
  const std::vector<float> priority = {0.1f, 0.7f, 0.7f, 0.9f};
  std::vector<int32_t> order(4);
  EXPECT_EQ(smoe::cpu::priority_order(priority.data(), 4, 1, order.data()), -1);
  EXPECT_EQ(order, (std::vector<int32_t>{3, 1, 2, 0}));  // tie 1 vs 2: lower index first
  PlanOut p = run_plan(expert, 4, 1, 1, 2, order.data(), 1);
  EXPECT_EQ(p.kept, (std::vector<char>{0, 1, 0, 1}));
  EXPECT_EQ(p.token, (std::vector<int32_t>{1, 3, -1, -1}));  // token order within the expert
}

TEST(MakePlan, PriorityOrderReportsNan) {
  const std::vector<float> priority = {0.1f, NAN};
  std::vector<int32_t> order(2);
  EXPECT_EQ(smoe::cpu::priority_order(priority.data(), 2, 1, order.data()), 1);
}

TEST(MakePlan, FindsInvalidExperts) {
  const std::vector<int32_t> expert = {0, -1, 3, -2};
  EXPECT_EQ(smoe::cpu::find_invalid_expert(expert.data(), 4, 4), 3);
  EXPECT_EQ(smoe::cpu::find_invalid_expert(expert.data(), 3, 4), -1);
}

TEST(Permute, GatherAndWeightedCombine) {
  const std::vector<float> x = {1, 2, 3, 4, 5, 6};  // T = 3, d = 2
  const std::vector<int32_t> token = {2, 0, -1};
  std::vector<float> xs(6);
  smoe::cpu::gather_rows(x.data(), 2, token.data(), 2, 0, 3, xs.data());
  EXPECT_EQ(xs, (std::vector<float>{5, 6, 1, 2, 0, 0}));
  const std::vector<int32_t> row = {1, -1, 0};  // k = 1
  const std::vector<float> w = {0.5f, 9.f, 2.f};
  std::vector<float> y(6);
  smoe::cpu::combine_rows(xs.data(), 2, row.data(), w.data(), 1, 2, 0, 3, y.data());
  EXPECT_EQ(y, (std::vector<float>{0.5f, 1.f, 0, 0, 10, 12}));
}

struct ExpertChoiceOut {
  std::vector<int32_t> token, slot, row;
  std::vector<double> weight;
};

// The three forward passes over all rows / segments, or with the segments split in two halves
// (as two threads would run them).
ExpertChoiceOut run_expert_choice(const std::vector<double>& logits, int64_t T, int64_t E,
                                  int64_t S, int64_t C, bool split = false) {
  const smoe::ExpertChoiceShape shape{T, E, S, C};
  const int64_t M = E * shape.total(), segments = E * shape.groups();
  std::vector<double> probs(T * E);
  std::vector<int32_t> scratch(E * T);
  ExpertChoiceOut o{std::vector<int32_t>(M, -1), std::vector<int32_t>(M, -1),
                    std::vector<int32_t>(T * E, -1), std::vector<double>(T * E)};
  EXPECT_EQ(smoe::cpu::expert_choice_probs(logits.data(), E, E, 0, T, probs.data()), -1);
  const int64_t mid = split ? segments / 2 : segments;
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, mid}, {mid, segments}}) {
    smoe::cpu::expert_choice_select(probs.data(), shape, b, e, scratch.data(), o.token.data(),
                                    o.slot.data(), o.row.data());
  }
  smoe::cpu::expert_choice_weights(probs.data(), o.row.data(), E, 0, T, o.weight.data());
  return o;
}

// T = 5, E = 2, groups {0, 1, 2} and {3, 4}. p[:, 0] = {.5, a, .5, 1 - a, .5} with
// a = e / (1 + e), p[:, 1] = 1 - p[:, 0]: tokens 0 and 2 tie for both experts in group 0.
const std::vector<double> kEcLogits = {0, 0, 1, 0, 0, 0, 0, 1, 0, 0};
const double kEcA = std::exp(1.0) / (1.0 + std::exp(1.0));

TEST(ExpertChoice, TopCPerGroupWithTiesToLowerTokenInTokenOrder) {
  // Capacity 2: expert 0 takes {1, 0 (tie with 2)} then the whole short group {3, 4};
  // expert 1 takes {0, 2} (token 1 is lowest) then {3, 4}. C_tot = 2 + 2.
  for (bool split : {false, true}) {
    const ExpertChoiceOut o = run_expert_choice(kEcLogits, 5, 2, 3, 2, split);
    EXPECT_EQ(o.token, (std::vector<int32_t>{0, 1, 3, 4, 0, 2, 3, 4}));
    EXPECT_EQ(o.slot, (std::vector<int32_t>{0, 2, 6, 8, 1, 5, 7, 9}));
    EXPECT_EQ(o.row, (std::vector<int32_t>{0, 4, 1, -1, -1, 5, 2, 6, 3, 7}));
    const std::vector<double> w = {0.5, 0.5, kEcA, 0, 0, 0.5, 1 - kEcA, kEcA, 0.5, 0.5};
    for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(o.weight[i], w[i], 1e-12) << i;
  }
}

TEST(ExpertChoice, CapacityOneSelectsInsideTheShortLastGroup) {
  // Capacity 1: expert 0 takes token 1, then 4 (p .5 > 1 - a); expert 1 takes token 0 (tie with
  // 2), then 3 (p a > .5). C_tot = 1 + 1.
  const ExpertChoiceOut o = run_expert_choice(kEcLogits, 5, 2, 3, 1);
  EXPECT_EQ(o.token, (std::vector<int32_t>{1, 4, 0, 3}));
  EXPECT_EQ(o.slot, (std::vector<int32_t>{2, 8, 1, 7}));
  EXPECT_EQ(o.row, (std::vector<int32_t>{-1, 2, 0, -1, -1, -1, -1, 3, 1, -1}));
  EXPECT_EQ(o.weight[4], 0.0);  // token 2 routed nowhere
  EXPECT_EQ(o.weight[5], 0.0);
}

TEST(ExpertChoice, ProbsReportTheFirstNanOrInfRow) {
  std::vector<float> logits = {0.f, 1.f, -INFINITY, 0.f, 2.f, NAN, INFINITY, 0.f};
  std::vector<float> probs(8);
  EXPECT_EQ(smoe::cpu::expert_choice_probs(logits.data(), 2, 2, 0, 4, probs.data()), 2);
  EXPECT_EQ(smoe::cpu::expert_choice_probs(logits.data(), 2, 2, 3, 4, probs.data()), 3);
  EXPECT_EQ(smoe::cpu::expert_choice_probs(logits.data(), 2, 2, 0, 2, probs.data()), -1);
  EXPECT_EQ(probs[2], 0.f);  // -inf is a mask: p = 0
  EXPECT_EQ(probs[3], 1.f);
}

TEST(ExpertChoice, BackwardIsSoftmaxGradientOfTheKeptEntries) {
  // d l_i = p_i (m_i g_i - sum_j m_j g_j p_j); expert 1 dropped (row -1).
  const std::vector<double> logits = {0.0, 1.0, -1.0};
  const std::vector<double> g = {1.0, 5.0, 2.0};
  const std::vector<int32_t> row = {0, -1, 7};
  std::vector<double> out(3);
  smoe::cpu::expert_choice_backward_rows(g.data(), logits.data(), 3, row.data(), 3, 0, 1,
                                         out.data());
  const double z = 1.0 + std::exp(1.0) + std::exp(-1.0);
  const double p[3] = {1.0 / z, std::exp(1.0) / z, std::exp(-1.0) / z};
  const double dot = 1.0 * p[0] + 2.0 * p[2];
  EXPECT_NEAR(out[0], p[0] * (1.0 - dot), 1e-12);
  EXPECT_NEAR(out[1], p[1] * (0.0 - dot), 1e-12);
  EXPECT_NEAR(out[2], p[2] * (2.0 - dot), 1e-12);
}

}  // namespace

namespace {

TEST(CosineScores, CosinesOfTheProjectedTokenAndNormalisedExperts) {
  // proj = I: z = h = (3, 4), zhat = (0.6, 0.8); experts (1, 0) and (0, 2) normalise to the axes.
  const std::vector<double> h = {3.0, 4.0}, proj = {1.0, 0.0, 0.0, 1.0}, e = {1.0, 0.0, 0.0, 2.0};
  std::vector<double> ehat(4), enorm(2), z(2), cos(2), logits(2);
  smoe::cpu::cosine_normalize_experts(e.data(), 2, 1e-4, 0, 2, ehat.data(), enorm.data());
  EXPECT_DOUBLE_EQ(enorm[1], 2.0);
  smoe::cpu::cosine_scores_rows(h.data(), 2, proj.data(), ehat.data(), 2, 2, 2, 1e-4, true, 0.5, 0,
                                1, z.data(), cos.data(), logits.data());
  EXPECT_NEAR(cos[0], 0.6, 1e-15);
  EXPECT_NEAR(cos[1], 0.8, 1e-15);
  EXPECT_NEAR(logits[1], 1.6, 1e-15);
}

TEST(CosineScores, NormDoesNotOverflowAndZeroStaysZero) {
  const float big[2] = {2e38f, 2e38f}, zero[2] = {0.0f, 0.0f};
  EXPECT_NEAR(smoe::cpu::robust_norm(big, 2) / 2e38f, std::sqrt(2.0f), 1e-6f);
  EXPECT_EQ(smoe::cpu::robust_norm(zero, 2), 0.0f);
}

}  // namespace
