//! Enums whose values have names on the wire and in the store (`RunState`, `Trigger`,
//! `UnitState`, `StopReason`, `EventKind`, `Stream`, `DispatchState`, `AgentState`): each
//! name is written once, in the enum's definition, and `ALL`, `as_str`, `FromStr` and
//! `Display` all come from it.

/// Defines a fieldless enum with a wire name per variant:
///
/// ```ignore
/// named_enum! {
///     /// Doc of the enum.
///     pub enum Colour("colour") {
///         /// Doc of the variant.
///         Red = "red",
///     }
/// }
/// ```
///
/// gives `Colour::ALL` (every value, in declaration order), `as_str`, `FromStr` (an error
/// naming every accepted value: `"pink" is not a colour (red)`) and `Display` (the name).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [$name; [$($wire),+].len()] = [$($name::$variant),+];

            /// The name on the wire and in the store.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    format!("{s:?} is not {} ({})", $what, names.join(", "))
                })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use crate::exec::Stream;
    use crate::fleet::AgentState;
    use crate::run::{RunState, StopReason, Trigger};
    use crate::store::{DispatchState, EventKind};
    use crate::unit::UnitState;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + FromStr<Err = String>,
    {
        for &v in all {
            assert_eq!(v.to_string().parse::<T>(), Ok(v));
        }
        let names: std::collections::HashSet<String> = all.iter().map(T::to_string).collect();
        assert_eq!(names.len(), all.len(), "two values share a name: {names:?}");
    }

    #[test]
    fn every_name_parses_back_to_its_value_and_names_are_distinct() {
        round_trips(&RunState::ALL);
        round_trips(&Trigger::ALL);
        round_trips(&StopReason::ALL);
        round_trips(&UnitState::ALL);
        round_trips(&EventKind::ALL);
        round_trips(&Stream::ALL);
        round_trips(&DispatchState::ALL);
        round_trips(&AgentState::ALL);
        let err = "later".parse::<RunState>().unwrap_err();
        assert!(err.starts_with("\"later\" is not a run state (queued, running,"), "{err}");
    }
}
