// BPE merging of one symbol sequence, the algorithm of lmstack/tokenizers/bpe_model.py (BPE.merge) in C++:
// a min-heap of (rank, position, merged id) candidates over a linked list of symbols; stale candidates
// (a neighbour merged since they were queued) are skipped when popped. Plain C ABI, loaded with ctypes.
//
// bpe_encode also does BPE.initial_symbols first (one symbol per UTF-8 character; a character the
// vocabulary lacks becomes its <0xXX> byte tokens with byte fallback, else the unknown token, fused when
// asked, else nothing), for models without continuing-subword prefix or end-of-word suffix.
#include <cstdint>
#include <functional>
#include <queue>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {
struct Table {
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged)
  std::unordered_map<std::string, int32_t> vocab;                   // token (UTF-8) -> id
  int32_t unk = -1;                                                 // -1: none
  bool fuse_unk = false, byte_fallback = false;
  int32_t byte_ids[256];                                            // <0xXX> ids, -1 where absent
};

inline int utf8_length(unsigned char lead) {
  return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
}

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

// tokens: n_tokens UTF-8 strings concatenated, offsets[i]..offsets[i+1] is token i with id ids[i].
void bpe_table_set_vocab(void* handle, const char* tokens, const int64_t* offsets, const int32_t* ids,
                         int64_t n_tokens, int32_t unk, int32_t fuse_unk, int32_t byte_fallback) {
  auto* table = static_cast<Table*>(handle);
  table->vocab.reserve(static_cast<size_t>(n_tokens) * 2);
  for (int64_t i = 0; i < n_tokens; ++i)
    table->vocab.emplace(std::string(tokens + offsets[i], tokens + offsets[i + 1]), ids[i]);
  table->unk = unk;
  table->fuse_unk = fuse_unk != 0;
  table->byte_fallback = byte_fallback != 0;
  static const char hex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
    auto it = table->vocab.find(name);
    table->byte_ids[b] = it == table->vocab.end() ? -1 : it->second;
  }
}

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

// Initial symbols of the UTF-8 text, then merges, into out (room for nbytes ids: at most one per byte).
int64_t bpe_encode(const void* handle, const char* text, int64_t nbytes, int32_t* out) {
  const auto* table = static_cast<const Table*>(handle);
  int64_t n = 0;
  bool unk_run = false;
  for (int64_t i = 0; i < nbytes;) {
    int len = utf8_length(static_cast<unsigned char>(text[i]));
    if (i + len > nbytes) len = static_cast<int>(nbytes - i);
    auto it = table->vocab.find(std::string(text + i, text + i + len));
    if (it != table->vocab.end()) {
      out[n++] = it->second;
      unk_run = false;
    } else {
      bool covered = table->byte_fallback;
      for (int k = 0; covered && k < len; ++k) covered = table->byte_ids[static_cast<unsigned char>(text[i + k])] >= 0;
      if (covered) {
        for (int k = 0; k < len; ++k) out[n++] = table->byte_ids[static_cast<unsigned char>(text[i + k])];
        unk_run = false;
      } else if (table->unk >= 0) {
        if (!(table->fuse_unk && unk_run)) out[n++] = table->unk;
        unk_run = true;
      }
    }
    i += len;
  }
  return bpe_merge(handle, out, n);
}
}
