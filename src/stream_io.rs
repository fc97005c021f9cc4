//! AsyncRead and AsyncWrite for an enum of streams, each call passed to the
//! variant at hand; the client and server sides each have one such enum.

/// `delegate_async_io!(Type { VariantA, VariantB, … })` for an enum whose
/// variants each hold one stream (boxed or not).
macro_rules! delegate_async_io {
    ($type:ident { $($variant:ident),+ $(,)? }) => {
        impl tokio::io::AsyncRead for $type {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($type::$variant(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $type {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($type::$variant(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($type::$variant(stream) => {
                        std::pin::Pin::new(stream).poll_write_vectored(cx, bufs)
                    })+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $($type::$variant(stream) => stream.is_write_vectored(),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($type::$variant(stream) => std::pin::Pin::new(stream).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($type::$variant(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),)+
                }
            }
        }
    };
}

pub(crate) use delegate_async_io;
