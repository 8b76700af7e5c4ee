// BPE merging of one symbol sequence, the algorithm of lmstack/tokenizers/bpe_model.py (BPE.merge) in C++:
// a min-heap of (rank, position, merged id) candidates over a linked list of symbols; stale candidates
// (a neighbour merged since they were queued) are skipped when popped. Plain C ABI, loaded with ctypes.
#include <cstdint>
#include <functional>
#include <queue>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {
struct Table {
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged)
};

inline uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}
}  // namespace

extern "C" {

void* bpe_table_new(const int32_t* left, const int32_t* right, const int32_t* rank, const int32_t* merged,
                    int64_t n) {
  auto* table = new Table();
  table->merges.reserve(static_cast<size_t>(n) * 2);
  for (int64_t i = 0; i < n; ++i) table->merges[pair_key(left[i], right[i])] = {rank[i], merged[i]};
  return table;
}

void bpe_table_free(void* table) { delete static_cast<Table*>(table); }

// Merges ids[0..n) in place; returns the number of symbols left.
int64_t bpe_merge(const void* handle, int32_t* ids, int64_t n) {
  if (n < 2) return n;
  const auto& merges = static_cast<const Table*>(handle)->merges;
  using Candidate = std::tuple<int32_t, int64_t, int32_t>;  // (rank, position, merged id)
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges.find(pair_key(a, b));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::vector<int64_t> next(n), prev(n);
  std::vector<char> alive(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    next[i] = i + 1 < n ? i + 1 : -1;
    prev[i] = i - 1;
    if (i + 1 < n)
      if (auto* m = lookup(ids[i], ids[i + 1])) heap.emplace(m->first, i, m->second);
  }
  while (!heap.empty()) {
    auto [rank, pos, merged] = heap.top();
    heap.pop();
    int64_t right = next[pos];
    if (!alive[pos] || right == -1) continue;
    auto* current = lookup(ids[pos], ids[right]);
    if (current == nullptr || current->second != merged) continue;  // stale
    ids[pos] = merged;
    alive[right] = 0;
    int64_t after = next[right];
    next[pos] = after;
    if (after != -1) {
      prev[after] = pos;
      if (auto* m = lookup(merged, ids[after])) heap.emplace(m->first, pos, m->second);
    }
    int64_t before = prev[pos];
    if (before != -1)
      if (auto* m = lookup(ids[before], merged)) heap.emplace(m->first, before, m->second);
  }
  int64_t out = 0;
  for (int64_t i = 0; i < n; ++i)
    if (alive[i]) ids[out++] = ids[i];
  return out;
}
}
