// The packed CPU linear alone, from C++ (no Python between calls): SmolLM2-135M's 120
// decoder linears (30 layers of qkv 576->960, o 576->576, gate_up 576->3072, down
// 1536->576; 425 MB of float32, more than the last-level cache, so every pass streams
// them from memory), M rows, best of 6 passes. For an A/B of two versions of the kernel,
// build one binary per version of engine/cpu_gemm.cpp and alternate them:
//
//   git show REV:engine/cpu_gemm.cpp > /tmp/gemm_rev.cpp
//   g++ -O3 -DNDEBUG -std=gnu++17 -Iengine -DGEMM_CPP='"/tmp/gemm_rev.cpp"' bench/linears_cpu.cpp -o /tmp/lin_rev -lpthread
//   g++ -O3 -DNDEBUG -std=gnu++17 -Iengine bench/linears_cpu.cpp -o /tmp/lin_now -lpthread
//   for i in 1 2 3; do /tmp/lin_rev 2 32; /tmp/lin_now 2 32; done     # threads, rows
#ifndef GEMM_CPP
#define GEMM_CPP "../engine/cpu_gemm.cpp"
#endif
#include GEMM_CPP

#include <chrono>
#include <cstdio>
#include <random>

int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
    const int64_t M = argc > 2 ? std::atoll(argv[2]) : 1;
    const int64_t shapes[4][2] = {{576, 960}, {576, 576}, {576, 3072}, {1536, 576}};
    std::mt19937 rng(0);
    std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
    // one buffer on huge pages, as the engine keeps a model's packed weights (on 4 KiB
    // pages the 8-row linears measured 1.1-1.2x slower and hid a gain the engine saw)
    std::vector<int64_t> offsets;
    int64_t total = 0;
    for (int layer = 0; layer < 30; ++layer)
        for (const auto& s : shapes) offsets.push_back(total), total += memgen::packed_size(s[0], s[1]);
    constexpr int64_t kHuge = int64_t(2) << 20;
    float* weights = static_cast<float*>(std::aligned_alloc(kHuge, (total * 4 + kHuge - 1) / kHuge * kHuge));
    memgen::advise_huge_pages(weights, total * 4);
    for (int64_t i = 0; i < total; ++i) weights[i] = uniform(rng);
    std::vector<float> x(M * 1536, 0.1f), y(M * 3072);
    const double bytes = double(total) * sizeof(float);
    double best = 1e9;
    for (int pass = 0; pass < 6; ++pass) {
        const auto start = std::chrono::steady_clock::now();
        size_t i = 0;
        for (int layer = 0; layer < 30; ++layer)
            for (const auto& s : shapes)
                memgen::packed_linear(x.data(), M, s[0], weights + offsets[i++], s[1], nullptr, y.data(), threads);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::printf("%ld rows, %d thread(s): %.2f ms  (%.1f GB/s of weights, %.1f G multiply-adds/s)\n", long(M), threads,
                best * 1e3, bytes / best / 1e9, double(M) * bytes / sizeof(float) / best / 1e9);
}
