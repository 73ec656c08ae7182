// Included by each generated kernel translation unit *after* the kernel program (so the
// program itself sees no standard header): the templates that turn a kernel's function type
// into a launch trampoline and parameter metadata.
//
//   DSV4EMU_KERNEL(name, "file.cu") -> dsv4emu_kernel { name, file, trampoline, arity, params }
//
// The trampoline unpacks CUDA-style kernelParams (params[i] points at argument i's value, as
// for cuLaunchKernel) into a call of the kernel. Parameter types are restricted at compile
// time to what common.cuh allows: pointers, int, unsigned int, long long and float.

#ifndef DSV4EMU_TABLE_H
#define DSV4EMU_TABLE_H

#include <cstddef>
#include <type_traits>
#include <utility>

#include "dsv4emu_abi.h"

namespace dsv4emu {

template <class T>
constexpr const char* scalar_name() {
    if constexpr (std::is_same_v<T, float>) return "float";
    else if constexpr (std::is_same_v<T, double>) return "double";
    else if constexpr (std::is_same_v<T, int>) return "int";
    else if constexpr (std::is_same_v<T, unsigned int>) return "unsigned int";
    else if constexpr (std::is_same_v<T, long long>) return "long long";
    else if constexpr (std::is_same_v<T, unsigned long long>) return "unsigned long long";
    else if constexpr (std::is_same_v<T, long>) return "long";
    else if constexpr (std::is_same_v<T, unsigned long>) return "unsigned long";
    else if constexpr (std::is_same_v<T, short>) return "short";
    else if constexpr (std::is_same_v<T, unsigned short>) return "unsigned short";
    else if constexpr (std::is_same_v<T, char>) return "char";
    else if constexpr (std::is_same_v<T, signed char>) return "signed char";
    else if constexpr (std::is_same_v<T, unsigned char>) return "unsigned char";
    else if constexpr (std::is_same_v<T, void>) return "void";
    else return "(other type)";
}

template <class T>
constexpr const char* pointer_name() {
    using P = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<P, float>) return std::is_const_v<T> ? "const float*" : "float*";
    else if constexpr (std::is_same_v<P, double>) return std::is_const_v<T> ? "const double*" : "double*";
    else if constexpr (std::is_same_v<P, int>) return std::is_const_v<T> ? "const int*" : "int*";
    else if constexpr (std::is_same_v<P, unsigned int>)
        return std::is_const_v<T> ? "const unsigned int*" : "unsigned int*";
    else if constexpr (std::is_same_v<P, long long>) return std::is_const_v<T> ? "const long long*" : "long long*";
    else if constexpr (std::is_same_v<P, unsigned long long>)
        return std::is_const_v<T> ? "const unsigned long long*" : "unsigned long long*";
    else if constexpr (std::is_same_v<P, short>) return std::is_const_v<T> ? "const short*" : "short*";
    else if constexpr (std::is_same_v<P, unsigned short>)
        return std::is_const_v<T> ? "const unsigned short*" : "unsigned short*";
    else if constexpr (std::is_same_v<P, char>) return std::is_const_v<T> ? "const char*" : "char*";
    else if constexpr (std::is_same_v<P, signed char>) return std::is_const_v<T> ? "const signed char*" : "signed char*";
    else if constexpr (std::is_same_v<P, unsigned char>)
        return std::is_const_v<T> ? "const unsigned char*" : "unsigned char*";
    else if constexpr (std::is_same_v<P, void>) return std::is_const_v<T> ? "const void*" : "void*";
    else return std::is_const_v<T> ? "const (other type)*" : "(other type)*";
}

template <class T>
constexpr unsigned int pointee_align() {
    if constexpr (std::is_void_v<T>) return 1;
    else return alignof(T);
}

template <class A>
constexpr dsv4emu_param param_of() {
    static_assert(std::is_pointer_v<A> || std::is_same_v<A, int> || std::is_same_v<A, unsigned int> ||
                      std::is_same_v<A, long long> || std::is_same_v<A, float>,
                  "dsv4 CUDA kernel parameters are pointers, int, unsigned int, long long or float (common.cuh)");
    if constexpr (std::is_pointer_v<A>) {
        using T = std::remove_pointer_t<A>;
        static_assert(!std::is_pointer_v<std::remove_cv_t<T>>, "kernel parameters may not be pointers to pointers");
        return dsv4emu_param{DSV4EMU_PARAM_POINTER, (unsigned int)sizeof(A), std::is_const_v<T> ? 1u : 0u,
                             pointee_align<T>(), pointer_name<T>()};
    } else if constexpr (std::is_same_v<A, float>) {
        return dsv4emu_param{DSV4EMU_PARAM_FLOAT, 4, 0, 0, "float"};
    } else if constexpr (std::is_same_v<A, long long>) {
        return dsv4emu_param{DSV4EMU_PARAM_LONG_LONG, 8, 0, 0, "long long"};
    } else {
        return dsv4emu_param{DSV4EMU_PARAM_INT, 4, 0, 0, scalar_name<A>()};
    }
}

template <class F>
struct signature;

template <class... A>
struct signature<void (*)(A...)> {
    static constexpr unsigned int arity = sizeof...(A);
    // One extra, zero entry so that a kernel without parameters still has an array.
    static constexpr dsv4emu_param params[sizeof...(A) + 1] = {param_of<A>()..., dsv4emu_param{0, 0, 0, 0, nullptr}};
};

template <class... A, std::size_t... I>
inline void invoke(void (*kernel)(A...), void* const* params, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(params[I])...);
}

template <auto Kernel>
void trampoline(void* const* params) {
    invoke(Kernel, params, std::make_index_sequence<signature<decltype(Kernel)>::arity>());
}

}  // namespace dsv4emu

#define DSV4EMU_KERNEL(name, file)                                                          \
    dsv4emu_kernel {                                                                        \
        #name, file, &::dsv4emu::trampoline<&name>, ::dsv4emu::signature<decltype(&name)>::arity, \
            ::dsv4emu::signature<decltype(&name)>::params                                   \
    }

#endif
