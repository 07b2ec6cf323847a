// Python bindings of the native host runtime: the module memgen._native. The
// only file of engine/ that knows Python: it converts between Python objects and
// the runtime's plain data, and keeps the Python objects behind the runtime's
// stream pointers alive (PyStepCore).
// C++ exceptions become Python exceptions (invalid_argument -> ValueError,
// out_of_range -> IndexError, runtime_error/logic_error -> RuntimeError).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "cpu_attention.h"
#include "cpu_gemm.h"
#include "cpu_ops.h"
#include "runtime.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace memgen;

namespace {

nb::list to_list(const std::vector<int32_t>& v) {
    nb::list out;
    for (int32_t x : v) out.append(x);
    return out;
}

// The StepCore as Python sees it: the native core, plus the Python objects behind
// its running sequences and its chunks. The runtime holds plain StreamCore
// pointers; the objects kept here keep those streams alive.
struct PyStepCore : StepCore {
    using StepCore::StepCore;
    std::vector<nb::object> running_seqs;     // the Sequence of each running() entry
    std::vector<nb::object> running_streams;  // its streams (one tuple each)
    std::vector<std::pair<nb::object, nb::object>> chunk_objs;  // (seq, stream) of each chunk

    void begin_step(int64_t budget) {
        begin(budget);
        chunk_objs.clear();
    }
    // (seq, stream) objects of the chunks the native side added since the last call
    void sync_chunks() {
        const std::vector<Chunk>& cs = chunks();
        for (size_t i = chunk_objs.size(); i < cs.size(); ++i) {
            nb::object stream = nb::find(cs[i].stream);
            if (!stream.is_valid()) throw std::logic_error("a chunk's stream has no Python object");
            chunk_objs.emplace_back(running_seqs.at(cs[i].seq), std::move(stream));
        }
    }
    bool admit_seq(nb::handle seq, nb::tuple streams) {
        SeqStreams cores;
        cores.reserve(streams.size());
        for (nb::handle s : streams) cores.push_back(nb::cast<StreamCore*>(s));
        if (!admit(std::move(cores))) return false;
        running_seqs.push_back(nb::borrow(seq));
        running_streams.push_back(streams);
        sync_chunks();
        return true;
    }
    std::pair<int64_t, bool> schedule(int64_t start) {
        try {
            auto r = schedule_running(start);
            sync_chunks();
            return r;
        } catch (...) {
            sync_chunks();   // the chunks made before the error
            throw;
        }
    }
    void remove_at(size_t i) {
        remove_running((int64_t)i);
        running_seqs.erase(running_seqs.begin() + i);
        running_streams.erase(running_streams.begin() + i);
    }
    void remove_seq(nb::handle seq) {
        for (size_t i = 0; i < running_seqs.size(); ++i)
            if (running_seqs[i].is(seq)) return remove_at(i);
        throw std::invalid_argument("remove_running: the sequence is not running");
    }
    nb::object pop_running() {
        if (running_seqs.empty()) throw std::out_of_range("pop_running: no sequence is running");
        nb::object seq = running_seqs.back();
        remove_at(running_seqs.size() - 1);
        return seq;
    }
};

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "memgen's native host runtime: block allocator, prefix cache, per-step scheduling and batch assembly";
    m.attr("EMBED") = kEmbed;

    nb::class_<StreamCore>(m, "StreamCore",
                           "A stream's positions (token ids; EMBED at embedding positions, with their digests) "
                           "and KV bookkeeping; memgen.engine.sequence.Stream subclasses it.")
        .def(nb::init<>())
        .def_prop_ro("token_ids", [](StreamCore& s) {
            // a tuple, so that a stale `stream.token_ids.append(t)` fails instead of changing a copy
            PyObject* out = PyTuple_New((Py_ssize_t)s.token_ids.size());
            if (!out) throw nb::python_error();
            for (size_t i = 0; i < s.token_ids.size(); ++i) {
                PyObject* t = PyLong_FromLongLong(s.token_ids[i]);
                if (!t) {
                    Py_DECREF(out);
                    throw nb::python_error();
                }
                PyTuple_SET_ITEM(out, (Py_ssize_t)i, t);
            }
            return nb::steal<nb::tuple>(out);
        }, "The stream's token ids (a tuple, read-only: append with append_token / append_tokens / "
           "append_embed; EMBED at embedding positions).")
        .def("append_token", &StreamCore::append_token, "token_id"_a)
        .def("append_tokens", [](StreamCore& s, const std::vector<int64_t>& ids) {
            s.token_ids.insert(s.token_ids.end(), ids.begin(), ids.end());
        }, "token_ids"_a)
        .def("append_embed", [](StreamCore& s, nb::handle digest) {
            if (digest.is_none()) return s.append_embed(nullptr);
            if (!nb::isinstance<nb::bytes>(digest)) throw nb::type_error("append_embed: digest must be bytes or None");
            nb::bytes b = nb::borrow<nb::bytes>(digest);
            const std::string d(b.c_str(), b.size());
            s.append_embed(&d);
        }, "digest"_a.none() = nb::none(),
           "An embedding-valued position (EMBED); its digest keys the prefix cache (None: a scratch "
           "position, never cached).")
        .def("drop_scratch", &StreamCore::drop_scratch,
             "Cut the trailing num_scratch positions (and their digests) off again.")
        .def_rw("name", &StreamCore::name)
        .def_prop_ro("block_table", [](StreamCore& s) { return to_list(s.block_table); },
                     "Block ids of the stream's positions (a copy).")
        .def_prop_ro("block_hashes", [](StreamCore& s) {
            nb::list out;
            for (uint64_t h : s.block_hashes) out.append(h);
            return out;
        })
        .def_prop_ro("num_blocks", [](StreamCore& s) { return s.block_table.size(); })
        .def_rw("num_computed_tokens", &StreamCore::num_computed_tokens)
        .def_rw("num_cached_tokens", &StreamCore::num_cached_tokens)
        .def_rw("num_scratch", &StreamCore::num_scratch)
        .def_rw("adapter_id", &StreamCore::adapter_id)
        .def_rw("pool_index", &StreamCore::pool_index)
        .def_rw("salt_id", &StreamCore::salt_id)
        .def_rw("due", &StreamCore::due)
        .def_rw("projected", &StreamCore::projected)
        .def_prop_ro("num_tokens", &StreamCore::num_tokens)
        .def_prop_ro("num_pending_tokens", &StreamCore::num_pending_tokens)
        .def("reset", &StreamCore::reset, "Forget the cache (after the blocks went back to the pool).");

    nb::class_<BlockManager>(m, "BlockManager",
                             "A pool of fixed-size KV blocks: reference counts, a free list that is also the "
                             "eviction order (least recently freed first), prefix caching by chained hashes "
                             "with a collision check. hash_bits < 64 truncates hashes (tests force collisions).")
        .def(nb::init<int64_t, int64_t, bool, int>(), "num_blocks"_a, "block_size"_a,
             "enable_prefix_caching"_a = true, "hash_bits"_a = 64)
        .def_prop_ro("num_blocks", &BlockManager::num_blocks)
        .def_prop_ro("block_size", &BlockManager::block_size)
        .def_prop_ro("enable_prefix_caching", &BlockManager::enable_prefix_caching)
        .def_prop_ro("num_free_blocks", &BlockManager::num_free_blocks)
        .def_rw("num_prefix_hit_tokens", &BlockManager::num_prefix_hit_tokens)
        .def_rw("num_prefix_query_tokens", &BlockManager::num_prefix_query_tokens)
        .def("blocks_for", &BlockManager::blocks_for, "num_tokens"_a)
        .def("find_cached_prefix", [](BlockManager& bm, StreamCore& s) { return to_list(bm.find_cached_prefix(s)); },
             "stream"_a, "Block ids of the stream's leading full blocks, as far as they are cached; the last "
                         "position is never covered.")
        .def("cache_full_blocks", [](BlockManager& bm, StreamCore& s) { bm.cache_full_blocks(s); },
             "stream"_a, "Register the stream's newly computed full blocks.")
        .def("num_free_blocks_needed",
             [](BlockManager& bm, StreamCore& s, int64_t n, std::vector<int32_t> hits) {
                 return bm.num_free_blocks_needed(s, n, hits);
             }, "stream"_a, "num_new_tokens"_a, "hits"_a = std::vector<int32_t>())
        .def("can_allocate",
             [](BlockManager& bm, StreamCore& s, int64_t n, std::vector<int32_t> hits) {
                 return bm.can_allocate(s, n, hits);
             }, "stream"_a, "num_new_tokens"_a, "hits"_a = std::vector<int32_t>())
        .def("allocate",
             [](BlockManager& bm, StreamCore& s, int64_t n, std::vector<int32_t> hits) {
                 bm.allocate(s, n, hits);
             }, "stream"_a, "num_new_tokens"_a, "hits"_a = std::vector<int32_t>(),
             "Cover num_new_tokens more positions; hits (from find_cached_prefix, on an empty stream) become "
             "its leading, computed blocks. Raises RuntimeError, changing nothing, when blocks run out.")
        .def("free", [](BlockManager& bm, StreamCore& s) { bm.free(s); }, "stream"_a,
             "Return the stream's blocks (last block first, so it is evicted first) and reset it.")
        .def("record_admission", [](BlockManager& bm, StreamCore& s) { bm.record_admission(s); },
             "stream"_a)
        .def("ref_count", &BlockManager::ref_count, "block_id"_a)
        .def("block_hash", [](BlockManager& bm, int64_t id) -> nb::object {
            uint64_t h;
            if (!bm.block_hash(id, &h)) return nb::none();
            return nb::int_(h);
        }, "block_id"_a)
        .def("free_block_ids", [](BlockManager& bm) { return to_list(bm.free_block_ids()); },
             "Free block ids in eviction order (oldest first).")
        .def("cached_blocks", [](BlockManager& bm) {
            nb::dict out;
            for (auto& [h, id] : bm.cached_blocks()) out[nb::int_(h)] = id;
            return out;
        }, "The prefix-cache table {hash: block id}.")
        .def("check_invariants", &BlockManager::check_invariants);

    nb::class_<InputBuffers>(m, "InputBuffers",
                             "Addresses and capacities of preallocated int64 buffers (the caller keeps them alive).")
        .def("__init__", [](InputBuffers* b, int64_t input_ids, int64_t positions, int64_t slot_mapping,
                            int64_t adapter_ids, int64_t max_rows, int64_t cu_seqlens_q, int64_t context_lens,
                            int64_t last_rows, int64_t max_chunks, int64_t block_tables, int64_t max_table) {
            for (int64_t p : {input_ids, positions, slot_mapping, adapter_ids, cu_seqlens_q, context_lens,
                              last_rows, block_tables})
                if (p == 0) throw std::invalid_argument("InputBuffers: null buffer address");
            auto ptr = [](int64_t p) { return reinterpret_cast<int64_t*>(p); };
            new (b) InputBuffers{ptr(input_ids), ptr(positions), ptr(slot_mapping), ptr(adapter_ids), max_rows,
                                 ptr(cu_seqlens_q), ptr(context_lens), ptr(last_rows), max_chunks,
                                 ptr(block_tables), max_table};
        });

    nb::class_<AssembleResult>(m, "AssembleResult")
        .def_ro("fits", &AssembleResult::fits)
        .def_ro("num_rows", &AssembleResult::num_rows)
        .def_ro("num_chunks", &AssembleResult::num_chunks)
        .def_ro("max_blocks", &AssembleResult::max_blocks)
        .def_ro("max_seqlen_q", &AssembleResult::max_seqlen_q)
        .def_ro("max_seqlen_k", &AssembleResult::max_seqlen_k)
        .def_ro("has_embeds", &AssembleResult::has_embeds)
        .def_ro("has_adapters", &AssembleResult::has_adapters);

    nb::class_<PyStepCore>(m, "StepCore",
                           "The running sequences (admission order) and one step's scheduled chunks, and the "
                           "per-step work on them.")
        .def(nb::init<std::vector<BlockManager*>>(), "block_managers"_a, nb::keep_alive<1, 2>())
        .def("begin", &PyStepCore::begin_step, "budget"_a, "Start a step: no chunks, this token budget.")
        .def_prop_ro("budget", &StepCore::budget)
        .def_prop_ro("step", &StepCore::step)
        .def_prop_ro("num_chunks", [](PyStepCore& c) { return c.chunks().size(); })
        .def_prop_ro("num_batched_tokens", [](PyStepCore& c) {
            int64_t n = 0;
            for (const Chunk& ch : c.chunks()) n += ch.num_tokens;
            return n;
        })
        .def("admit", &PyStepCore::admit_seq, "seq"_a, "streams"_a,
             "Admit a waiting sequence (streams: its streams, a tuple): blocks and chunks for its due "
             "streams from their cached prefixes on, under the budget. Atomic: True (it joins the running "
             "sequences) or False, nothing changed; an error frees every stream and propagates.")
        .def("schedule_running", &PyStepCore::schedule, "start"_a,
             "Catch the running sequences' due streams up from index start under the budget; returns "
             "(index where it stopped, whether that sequence could not get blocks).")
        .def_prop_ro("num_running", [](PyStepCore& c) { return c.running_seqs.size(); })
        .def_prop_ro("running", [](PyStepCore& c) {
            nb::list out;
            for (const nb::object& s : c.running_seqs) out.append(s);
            return out;
        }, "The running sequences in admission order (a copy).")
        .def("running_at", [](PyStepCore& c, size_t i) { return c.running_seqs.at(i); }, "index"_a)
        .def("pop_running", &PyStepCore::pop_running, "Take the most recently admitted sequence out.")
        .def("remove_running", &PyStepCore::remove_seq, "seq"_a, "Take a running sequence out.")
        .def("chunk_tuples", [](PyStepCore& c) {
            nb::list out;
            const std::vector<Chunk>& cs = c.chunks();
            for (size_t i = 0; i < cs.size(); ++i)
                out.append(nb::make_tuple(c.chunk_objs[i].first, c.chunk_objs[i].second, cs[i].start,
                                          cs[i].num_tokens));
            return out;
        }, "(seq, stream, start, num_tokens) of every chunk.")
        .def("pool_indices", [](PyStepCore& c) {
            nb::list out;
            for (const Chunk& ch : c.chunks()) out.append(ch.stream->pool_index);
            return out;
        })
        .def("postprocess", &StepCore::postprocess, "Mark every chunk computed and register its full blocks.")
        .def("assemble", &StepCore::assemble, "pool_index"_a, "block_size"_a, "buffers"_a,
             "Write the chunks of one pool (-1: all) into the buffers: input ids, positions, slot mapping, "
             "adapter id per row; cu_seqlens_q, context lens, last rows, -1 padded block tables per chunk.");

    // Tensors pass as data addresses: layers/backend.py checks their dtype, layout and device.
    m.def("paged_attention_cpu",
          [](uintptr_t k, uintptr_t v, uintptr_t slot_mapping, int64_t num_store_rows, uintptr_t q,
             uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, uintptr_t cu_seqlens_q,
             uintptr_t context_lens, uintptr_t block_tables, int64_t num_chunks, int64_t max_blocks,
             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t num_blocks,
             double scale, int dtype, int num_threads, int64_t q_row_stride, int64_t kv_row_stride,
             uintptr_t rope_cos, uintptr_t rope_sin) {
              if (dtype < 0 || dtype > 2) throw nb::value_error("dtype code must be 0 (f32), 1 (f64) or 2 (bf16)");
              PagedAttentionArgs a{reinterpret_cast<const void*>(k), reinterpret_cast<const void*>(v),
                                   reinterpret_cast<const int64_t*>(slot_mapping), num_store_rows,
                                   reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k_cache),
                                   reinterpret_cast<const void*>(v_cache), reinterpret_cast<void*>(out),
                                   reinterpret_cast<const int64_t*>(cu_seqlens_q),
                                   reinterpret_cast<const int64_t*>(context_lens),
                                   reinterpret_cast<const int64_t*>(block_tables), num_chunks, max_blocks,
                                   num_heads, num_kv_heads, head_dim, block_size, num_blocks, scale,
                                   static_cast<AttnDtype>(dtype), num_threads, q_row_stride, kv_row_stride,
                                   reinterpret_cast<const void*>(rope_cos), reinterpret_cast<const void*>(rope_sin)};
              paged_attention_cpu(a);
          },
          nb::call_guard<nb::gil_scoped_release>(),
          "Store this forward's K/V (k == 0: none), then paged attention on the CPU straight from the KV "
          "blocks (engine/cpu_attention.h).");
    m.def("rms_norm_cpu",
          [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t out, int64_t rows, int64_t hidden,
             double eps, int dtype) {
              rms_norm_cpu(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(residual),
                           reinterpret_cast<const void*>(weight), reinterpret_cast<void*>(out), rows, hidden, eps,
                           static_cast<AttnDtype>(dtype));
          },
          "RMSNorm of contiguous rows, after residual += x in place when residual != 0 (engine/cpu_ops.h).");
    m.def("silu_and_mul_cpu",
          [](uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t width, int dtype) {
              silu_and_mul_cpu(reinterpret_cast<const void*>(gate_up), reinterpret_cast<void*>(out), rows, width,
                               static_cast<AttnDtype>(dtype));
          },
          "silu(gate) * up of a contiguous [rows, 2 * width] gate-up output (engine/cpu_ops.h).");
    m.def("argmax_rows_f32",
          [](uintptr_t x, int64_t rows, int64_t width, uintptr_t out) {
              argmax_rows_f32(reinterpret_cast<const float*>(x), rows, width, reinterpret_cast<int64_t*>(out));
          },
          "torch.argmax(x, -1) of a contiguous float32 [rows, width] into int64 out (engine/cpu_ops.h).");
    m.def("bf16_to_f32",
          [](uintptr_t x, int64_t n, uintptr_t out) {
              bf16_to_f32(reinterpret_cast<const uint16_t*>(x), n, reinterpret_cast<float*>(out));
          },
          "out = x.float() for n contiguous bfloat16 values, on the calling thread (engine/cpu_ops.h).");
    m.def("linear_isa", &linear_isa, "the instruction set the packed CPU linear runs (engine/cpu_gemm.h)");
    m.def("linear_threads", &linear_threads, "M"_a, "K"_a, "N"_a, "num_threads"_a,
          "threads packed_linear would use for x [M, K] and an [N, K] W under a budget of num_threads "
          "(1: the call is too small to wake another; engine/cpu_gemm.h)");
    m.def("set_linear_split", [](const std::string& mode) { set_linear_split(mode.c_str()); }, "mode"_a,
          "when packed_linear splits a call across threads: 'stream' (default: a thread per ~20 us of "
          "estimated work, few-row decode calls included), 'sums' (4M multiply-adds per thread) or 'off' "
          "(engine/cpu_gemm.h)");
    m.def("linear_split", &linear_split, "the split rule in force ('sums', 'stream' or 'off')");
    m.def("packed_size", &packed_size, "floats the packed form of a [K, N] matrix takes (engine/cpu_gemm.h)");
    m.def("pack_weight",
          [](uintptr_t w_t, int64_t K, int64_t N, uintptr_t packed) {
              pack_weight(reinterpret_cast<const float*>(w_t), K, N, reinterpret_cast<float*>(packed));
          },
          "pack W^T ([K, N] row-major float32) into 16-column panels (engine/cpu_gemm.h)");
    m.def("pack_rows",
          [](uintptr_t w, int64_t rows, int64_t K, int64_t N, int64_t col0, uintptr_t packed) {
              pack_rows(reinterpret_cast<const float*>(w), rows, K, N, col0, reinterpret_cast<float*>(packed));
          },
          "write W's rows [col0, col0 + rows) ([rows, K] row-major float32) into a packed [K, N] matrix");
    m.def("packed_linear",
          [](uintptr_t x, int64_t M, int64_t K, uintptr_t packed, int64_t N, uintptr_t bias, uintptr_t y,
             int num_threads) {
              packed_linear(reinterpret_cast<const float*>(x), M, K, reinterpret_cast<const float*>(packed), N,
                            reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), num_threads);
          },
          nb::call_guard<nb::gil_scoped_release>(),
          "y = x W^T + b with a packed W, float32, contiguous x [M, K] and y [M, N] (engine/cpu_gemm.h)");
    m.def("decoder_layers_cpu",
          [](uintptr_t table, int64_t fields, uintptr_t reals, int64_t num_layers, uintptr_t x, uintptr_t out_a,
             uintptr_t out_b, int64_t rows, uintptr_t slot_mapping, uintptr_t cu_seqlens_q, uintptr_t context_lens,
             uintptr_t block_tables, int64_t num_chunks, int64_t max_blocks, int num_threads, uintptr_t rope_cos,
             uintptr_t rope_sin) {
              // a layer's row of `table` (int64): the fields in layers/backend.py's _LayerPlan order;
              // of `reals` (float64): eps, scale. A row of another width was written for another
              // field list: refused, not misread
              constexpr int64_t kFields = 23;
              if (fields != kFields)
                  throw std::invalid_argument("decoder_layers_cpu: a layer's table row has " + std::to_string(fields) +
                                              " fields, this build reads " + std::to_string(kFields));
              auto P = [](int64_t v) { return reinterpret_cast<const void*>(v); };
              std::vector<DecoderLayerArgs> layers(num_layers);
              for (int64_t i = 0; i < num_layers; ++i) {
                  const int64_t* t = reinterpret_cast<const int64_t*>(table) + i * kFields;
                  const double* r = reinterpret_cast<const double*>(reals) + i * 2;
                  const bool rope = t[22] != 0;
                  PagedAttentionArgs at{nullptr, nullptr, reinterpret_cast<const int64_t*>(slot_mapping), rows,
                                        nullptr, P(t[14]), P(t[15]), nullptr,
                                        reinterpret_cast<const int64_t*>(cu_seqlens_q),
                                        reinterpret_cast<const int64_t*>(context_lens),
                                        reinterpret_cast<const int64_t*>(block_tables), num_chunks, max_blocks,
                                        t[16], t[17], t[18], t[19], t[20], r[1], static_cast<AttnDtype>(t[21]),
                                        num_threads, 0, 0, rope ? P(int64_t(rope_cos)) : nullptr,
                                        rope ? P(int64_t(rope_sin)) : nullptr};
                  layers[i] = DecoderLayerArgs{nullptr, nullptr, nullptr, rows, t[0], t[1], t[2], t[3], P(t[4]),
                                               P(t[5]), r[0], P(t[6]), P(t[7]), P(t[8]), P(t[9]), P(t[10]),
                                               P(t[11]), P(t[12]), P(t[13]), at};
              }
              void* const out[2] = {reinterpret_cast<void*>(out_a), reinterpret_cast<void*>(out_b)};
              return decoder_layers_cpu(layers.data(), num_layers, reinterpret_cast<void*>(x), out);
          },
          nb::call_guard<nb::gil_scoped_release>(),
          "a model's decoder layers on the CPU in one call; returns which out buffer holds the result "
          "(engine/cpu_ops.h decoder_layers_cpu)");
    m.def("advise_huge_pages",
          [](uintptr_t p, int64_t bytes) { return advise_huge_pages(reinterpret_cast<void*>(p), bytes); },
          "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of [p, p + bytes) (engine/cpu_gemm.h)");
    m.def("linear_isa_bf16", &linear_isa_bf16, "the instruction set bfloat16 weights run on (engine/cpu_gemm.h)");
    m.def("packed_size_bf16", &packed_size_bf16, "bfloat16 values the packed form of a [K, N] matrix takes");
    m.def("pack_rows_bf16",
          [](uintptr_t w, int64_t rows, int64_t K, int64_t N, int64_t col0, uintptr_t packed) {
              pack_rows_bf16(reinterpret_cast<const uint16_t*>(w), rows, K, N, col0,
                             reinterpret_cast<uint16_t*>(packed));
          },
          "write W's rows [col0, col0 + rows) ([rows, K] row-major bfloat16) into a packed [K, N] matrix");
    m.def("unpack_rows",
          [](uintptr_t packed, int64_t K, int64_t N, uintptr_t ids, int64_t n, uintptr_t out, bool bf16) {
              unpack_rows(reinterpret_cast<const void*>(packed), K, N, reinterpret_cast<const int64_t*>(ids), n,
                          reinterpret_cast<void*>(out), bf16);
          },
          "rows `ids` (int64) of W read back from its packed form into out [n, K] (engine/cpu_gemm.h)");
    m.def("packed_linear_bf16",
          [](uintptr_t x, int64_t M, int64_t K, uintptr_t packed, int64_t N, uintptr_t bias, uintptr_t y,
             int num_threads) {
              packed_linear_bf16(reinterpret_cast<const uint16_t*>(x), M, K,
                                 reinterpret_cast<const uint16_t*>(packed), N,
                                 reinterpret_cast<const uint16_t*>(bias), reinterpret_cast<uint16_t*>(y),
                                 num_threads);
          },
          nb::call_guard<nb::gil_scoped_release>(),
          "y = x W^T + b with a packed bfloat16 W, contiguous bfloat16 x [M, K] and y [M, N] (engine/cpu_gemm.h)");
}
