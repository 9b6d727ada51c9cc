// Runs emulated kernels on buffers read from files: the executable side of
// tests/host_kernels.rs. One job file per run, one command per line:
//
//   buffer <id> <path>        load a buffer (its size is the file's); ids count from 0
//   launch <kernel> <gx> <gy> <gz> <bx> <by> <bz> <shared_bytes> <nargs> <arg>...
//                             arg: b<id> (the buffer's address), null, u32:<n>, u64:<n>,
//                             f32:<hex bits>
//   save <id> <path>          write a buffer back after the launches
//
// Every buffer sits between inaccessible pages, its end against the next one, so an
// out-of-bounds access faults (and cuda_emu names the kernel, block and thread).
#include <fstream>
#include <iostream>
#include <sstream>

namespace {

struct Buffer {
    unsigned char* data = nullptr;
    size_t size = 0;
};

[[noreturn]] void die(const std::string& message) {
    std::cerr << "host_kernels driver: " << message << std::endl;
    std::exit(2);
}

Buffer guarded(size_t size) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t rounded = (size + 7) / 8 * 8;
    const size_t body = (rounded + page - 1) / page * page;
    void* p = mmap(nullptr, body + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        die("cannot map a buffer");
    }
    unsigned char* base = static_cast<unsigned char*>(p);
    mprotect(base, page, PROT_NONE);
    mprotect(base + page + body, page, PROT_NONE);
    Buffer b;
    b.data = base + page + body - rounded;
    b.size = size;
    return b;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        die("usage: driver JOB");
    }
    std::ifstream job(argv[1]);
    if (!job) {
        die(std::string("cannot read ") + argv[1]);
    }
    std::vector<Buffer> buffers;
    std::string line;
    while (std::getline(job, line)) {
        std::istringstream in(line);
        std::string command;
        if (!(in >> command)) {
            continue;
        }
        if (command == "buffer") {
            size_t id;
            std::string path;
            in >> id >> path;
            std::ifstream file(path, std::ios::binary);
            if (!file || id != buffers.size()) {
                die("bad buffer line: " + line);
            }
            std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
            Buffer b = guarded(bytes.size());
            std::memcpy(b.data, bytes.data(), bytes.size());
            buffers.push_back(b);
        } else if (command == "launch") {
            std::string name;
            cuda_emu::LaunchConfig cfg;
            size_t nargs;
            in >> name >> cfg.grid[0] >> cfg.grid[1] >> cfg.grid[2] >> cfg.block[0] >> cfg.block[1] >> cfg.block[2] >>
                cfg.shared_bytes >> nargs;
            const auto found = cuda_emu::registry().find(name);
            if (!in || found == cuda_emu::registry().end()) {
                die("unknown kernel or bad launch line: " + line);
            }
            // Values live in 8-byte cells; params[i] points to cell i, as kernelParams do.
            std::vector<unsigned long long> cells(nargs, 0);
            std::vector<void*> params(nargs);
            for (size_t i = 0; i < nargs; ++i) {
                std::string arg;
                in >> arg;
                void* cell = &cells[i];
                if (arg == "null") {
                    void* null = nullptr;
                    std::memcpy(cell, &null, sizeof null);
                } else if (arg[0] == 'b') {
                    const size_t id = std::stoul(arg.substr(1));
                    if (id >= buffers.size()) {
                        die("no buffer " + arg);
                    }
                    void* address = buffers[id].data;
                    std::memcpy(cell, &address, sizeof address);
                } else if (arg.rfind("u32:", 0) == 0) {
                    const unsigned v = (unsigned)std::stoul(arg.substr(4));
                    std::memcpy(cell, &v, sizeof v);
                } else if (arg.rfind("u64:", 0) == 0) {
                    const unsigned long long v = std::stoull(arg.substr(4));
                    std::memcpy(cell, &v, sizeof v);
                } else if (arg.rfind("f32:", 0) == 0) {
                    const unsigned bits = (unsigned)std::stoul(arg.substr(4), nullptr, 16);
                    std::memcpy(cell, &bits, sizeof bits);
                } else {
                    die("bad argument " + arg);
                }
                params[i] = cell;
            }
            found->second(cfg, params.data());
        } else if (command == "save") {
            size_t id;
            std::string path;
            in >> id >> path;
            if (id >= buffers.size()) {
                die("bad save line: " + line);
            }
            std::ofstream file(path, std::ios::binary);
            file.write(reinterpret_cast<const char*>(buffers[id].data), (std::streamsize)buffers[id].size);
            if (!file) {
                die("cannot write " + path);
            }
        } else {
            die("unknown command: " + line);
        }
    }
    return 0;
}
