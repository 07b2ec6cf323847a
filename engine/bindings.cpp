// Python bindings of the native host runtime: the module memgen._native.
// C++ exceptions become Python exceptions (invalid_argument -> ValueError,
// out_of_range -> IndexError, runtime_error/logic_error -> RuntimeError).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

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

StreamCore* stream_of(nb::handle obj) { return stream_from(obj.ptr()); }

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "memgen's native host runtime: block allocator, prefix cache, per-step scheduling and batch assembly";
    m.attr("EMBED") = kEmbed;

    nb::class_<StreamCore>(m, "StreamCore", "A stream's KV bookkeeping; memgen.engine.sequence.Stream subclasses it.")
        .def(nb::init<>())
        .def_prop_rw("token_ids", [](StreamCore& s) { return nb::borrow<nb::list>(s.token_ids); },
                     [](StreamCore& s, nb::handle v) { s.set_token_ids(v.ptr()); })
        .def_prop_rw("embed_keys", [](StreamCore& s) { return nb::borrow<nb::dict>(s.embed_keys); },
                     [](StreamCore& s, nb::handle v) { s.set_embed_keys(v.ptr()); })
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
        .def_prop_ro("num_pending_tokens", [](StreamCore& s) { return s.num_tokens() - s.num_computed_tokens; })
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

    static PyObject* streams_attr = PyUnicode_InternFromString("stream_list");  // never freed
    nb::class_<StepCore>(m, "StepCore", "One step's scheduled chunks, and the per-step work on them.")
        .def(nb::init<std::vector<BlockManager*>>(), "block_managers"_a, nb::keep_alive<1, 2>())
        .def("begin", &StepCore::begin, "budget"_a)
        .def_prop_ro("budget", &StepCore::budget)
        .def_prop_ro("step", &StepCore::step)
        .def_prop_ro("num_chunks", [](StepCore& c) { return c.chunks().size(); })
        .def_prop_ro("num_batched_tokens", [](StepCore& c) {
            int64_t n = 0;
            for (const Chunk& ch : c.chunks()) n += ch.num_tokens;
            return n;
        })
        .def("add_chunk", [](StepCore& c, nb::handle seq, nb::handle stream, int64_t start, int64_t n) {
            c.add_chunk(seq.ptr(), stream.ptr(), stream_of(stream), start, n);
        }, "seq"_a.none(), "stream"_a, "start"_a, "num_tokens"_a)
        .def("schedule_running", [](StepCore& c, nb::handle running, int64_t start) {
            return c.schedule_running(running.ptr(), start, streams_attr);
        }, "running"_a, "start"_a,
           "Catch running sequences (seq.stream_list, streams with .due) up from index start under the "
           "budget; returns (index where it stopped, whether that sequence could not get blocks).")
        .def("chunk_tuples", [](StepCore& c) {
            nb::list out;
            for (const Chunk& ch : c.chunks())
                out.append(nb::make_tuple(nb::borrow(ch.seq ? ch.seq : Py_None), nb::borrow(ch.stream_obj),
                                          ch.start, ch.num_tokens));
            return out;
        }, "(seq, stream, start, num_tokens) of every chunk.")
        .def("pool_indices", [](StepCore& c) {
            nb::list out;
            for (const Chunk& ch : c.chunks()) out.append(ch.stream->pool_index);
            return out;
        })
        .def("postprocess", &StepCore::postprocess, "Mark every chunk computed and register its full blocks.")
        .def("assemble", &StepCore::assemble, "pool_index"_a, "block_size"_a, "buffers"_a,
             "Write the chunks of one pool (-1: all) into the buffers: input ids, positions, slot mapping, "
             "adapter id per row; cu_seqlens_q, context lens, last rows, -1 padded block tables per chunk.");
}
